"""The lora_jax side of `benchmarks.gpu`: one configuration per call, in a long-lived worker.

Each call compiles the real train step (trainer's pieces, chunked LM loss, donated state) on
abstract shapes first, so a batch that does not fit the device is refused from XLA's own
memory analysis before anything is allocated; the first candidate batch that fits is timed.
Params are kept between calls of the same model and layout (a step returns them unchanged).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from benchmarks.common import optimizer_config
from benchmarks.gpu_plan import hf_config
from benchmarks.steps import LLAMA_ALL
from lora_jax.models import LoadedModel, build_module
from lora_jax.models.lm_loss import next_token_fn
from lora_jax.models.loading import param_shapes
from lora_jax.models.remat import POLICIES
from lora_jax.tasks.causal_lm import training_loss
from lora_jax.train_step import TrainState, make_optimizer, make_train_step, model_apply

FIT_MARGIN = 0.97  # of the allocator's free pool: room for fragmentation and library workspaces
_params: dict[tuple, Any] = {}  # (model, scan_layers) -> params, reused across calls
_cpu_rate: list[float] = []


def _sds(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _bf16(tree: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, jnp.bfloat16 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype), tree)


def _random_params(params_sds: Any) -> Any:
    """bf16 weights drawn on the device as HF initialises Llama (normal 0.02, norm scales 1), in
    one small program: no float32 copy of the model, no compile of the model's forward."""
    def fill(key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params_sds)
        out = [jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path) else
               0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
               for i, (path, s) in enumerate(leaves)]
        return jax.tree.unflatten(treedef, out)

    return jax.jit(fill)(jax.random.key(0))


def _need_bytes(compiled: Any) -> int:
    """Device bytes the executable holds at once: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def _tree_bytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _available(key: tuple) -> int | None:
    """Free bytes of the device's allocator pool, counting our cached params of this key as free
    (they become the state's); None where the backend reports no limit (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    own = _tree_bytes(_params[key]) if key in _params else 0
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0) + own)


def run(cfg: dict) -> dict:
    """Compile `cfg` at its candidate batches (largest first) until one fits, then time it."""
    if cfg["policy"] not in POLICIES:
        raise ValueError(f"remat policy {cfg['policy']!r} is not one of {POLICIES}")
    hf, seq, key = hf_config(cfg["shape"]), cfg["seq"], (cfg["model"], cfg["scan"])
    _family, module, config = build_module(hf, jnp.bfloat16, scan_layers=cfg["scan"],
                                           remat=cfg["policy"], attention=cfg["attention"])
    params_sds = _bf16(param_shapes(module))
    model = LoadedModel(lambda p, i, m=None: module.apply(p, i, m), params_sds, config, None,
                        "llama", "", module, hf)
    fn = next_token_fn(model)  # training: the head applied per sequence chunk, no fp32 [B,T,V]
    spec = lora_jax.LoraSpec(targets=LLAMA_ALL, rank=cfg["rank"], alpha=2.0 * cfg["rank"])
    tx, schedule = make_optimizer(optimizer_config(), 1000)
    step = jax.jit(make_train_step(model_apply("lora", fn), training_loss, tx, schedule, 1,
                                   use_rng=False), donate_argnums=0)
    for other in [k for k in _params if k[0] != cfg["model"]]:
        del _params[other]  # another model's weights: free the device for this one
    tried, available, chosen = [], _available(key), None
    for batch in cfg["batches"]:
        ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        adapters = jax.eval_shape(lambda p, i: lora_jax.init(jax.random.key(1), fn, p, i, spec=spec),
                                  params_sds, ids)
        trainable = {"adapters": adapters, "extra": {}}
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                           frozen=params_sds, opt_state=jax.eval_shape(tx.init, trainable),
                           rng=jax.eval_shape(lambda: jax.random.key(2)))
        t0 = time.perf_counter()
        compiled = step.lower(state, {"input_ids": ids, "attention_mask": ids}).compile()
        compile_s, need = time.perf_counter() - t0, _need_bytes(compiled)
        if available is None:  # CPU: no limit, unless --small simulates one
            fits = batch <= cfg.get("simulate_max_batch", batch)
        else:
            fits = need <= FIT_MARGIN * available
        tried.append({"batch": batch, "need_bytes": need, "fits": fits, "compile_s": compile_s})
        if fits:
            chosen = (batch, compiled, compile_s, need)
            break
        del compiled
    out = {"framework": "lora_jax", "jax": jax.__version__, "remat": config.remat,
           "attention": config.attention, "scan": config.scan_layers, "tried": tried,
           "available_bytes": available, **_device()}
    if chosen is None:
        gib = (available or 0) / 2**30
        return {**out, "error": f"does not fit: no batch of {cfg['batches']} needs <= "
                                f"{FIT_MARGIN:.2f} x {gib:.1f} GiB free"}
    batch, compiled, compile_s, need = chosen
    return {**out, **_time(cfg, key, params_sds, fn, spec, tx, compiled, batch), "batch": batch,
            "compile_s": compile_s, "compiled_bytes": need}


def _time(cfg: dict, key: tuple, params_sds, fn, spec, tx, compiled, batch: int) -> dict:
    t0 = time.perf_counter()
    if key not in _params:
        _params[key] = _random_params(params_sds)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg["shape"]["vocab_size"], (batch, cfg["seq"])), jnp.int32)
    batch_d = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    params = _params.pop(key)
    adapters = lora_jax.init(jax.random.key(1), fn, params, ids, spec=spec)
    trainable = {"adapters": adapters, "extra": {}}
    state = TrainState(step=jnp.int32(0), trainable=trainable, frozen=params,
                       opt_state=jax.jit(tx.init)(trainable), rng=jax.random.key(2))
    del params  # donated with the state; the step hands them back
    init_s = time.perf_counter() - t0
    warmup, steps = cfg["warmup"], cfg["steps"]
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch_d)
        loss = float(jax.block_until_ready(metrics["loss"]))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    _params[key] = state.frozen
    stats = jax.devices()[0].memory_stats() or {}
    return {"init_s": init_s, "times_s": times, "median_s": statistics.median(times), "loss": loss,
            "adapter_params": lora_jax.count_params(adapters),
            "process_peak_bytes": stats.get("peak_bytes_in_use")}


def _device() -> dict:
    dev = jax.devices()[0]
    out = {"device": dev.device_kind, "platform": dev.platform}
    if dev.platform == "cpu":  # a peak to divide by on CPU: the measured bf16 matmul rate
        if not _cpu_rate:
            _cpu_rate.append(_matmul_rate())
        out["matmul_bf16_flops_per_s"] = _cpu_rate[0]
    return out


def _matmul_rate(n: int = 1024) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, a))
    t = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(f(a, a))
    return 2 * n**3 * 5 / (time.perf_counter() - t)
