"""Per-device memory of LoRA vs full fine-tuning at real model sizes, without any weights.

    python -m benchmarks.plan --model llama3-8b --mesh fsdp=8 --rank 16
    python -m benchmarks.plan --model llama3-70b --mesh data=2,fsdp=8,tensor=4 --batch 16 --seq 4096
    python -m benchmarks.plan --model llama3-8b --quant nf4 --mesh data=1 --batch 1   # QLoRA too
    python -m benchmarks.plan --model qwen3-30b-a3b --targets moe --mesh fsdp=8      # MoE experts

The trainer's own step (make_train_step, model_apply, make_optimizer, the sharding rules) is
built on jax.eval_shape params of the true shapes, compiled ahead of time for a mesh of fake
CPU devices, and XLA's memory analysis of that executable is set beside a hand count of
weights, gradients, optimizer state and activations. Nothing the size of the model is allocated.
With --quant, a QLoRA step (LoRA over a base whose linear kernels are quantised as
lora_jax.models.load(quant=...) quantises them, replicated on every device) is planned as well.
CPU caveat: XLA:CPU has no bf16 matmul, so it converts bf16 operands to f32; temporaries of a
GPU/TPU compile of the same step are somewhat smaller. MoE presets lower ragged_dot (which
XLA:CPU lacks) as a loop over experts that holds a grouped matmul's memory
(benchmarks/moe_lowering.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "tinyllama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0),
    # MoE (lora_jax/models/moe.py): every layer's MLP is top-k routed experts
    "tiny-moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=64,
                     intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                     num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, rope_theta=1000000.0),
}
TARGETS = {"qv": r".*/(q_proj|v_proj)/kernel",
           "all": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
           "moe": r".*/(q_proj|k_proj|v_proj|o_proj)/kernel|.*/experts/(gate_up_proj|down_proj)"}


def hf_config(model: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False,
            **PRESETS[model]}


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, n = part.partition("=")
        if name not in sizes:
            raise SystemExit(f"mesh axis {name!r}: expected data, fsdp or tensor")
        sizes[name] = int(n)
    return sizes


def _per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` laid out by `shardings` (the hand count of the layout)."""
    import jax
    import numpy as np

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def _activations(c: Any, mesh: dict, batch: int, seq: int, dsize: int, remat: bool,
                 logit_positions: int | None = None) -> int:
    """Hand count of activation bytes per device at the backward's peak."""
    b = batch / (mesh["data"] * mesh["fsdp"])
    tp = mesh["tensor"]
    D, F, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    H, V = c.num_attention_heads, c.vocab_size
    kv = c.num_key_value_heads * c.head_dim
    routed = 0
    if getattr(c, "num_experts", 0):  # MoE: each token's k experts, plus its sorted copies
        F, routed = c.num_experts_per_tok * c.moe_intermediate_size, 2 * c.num_experts_per_tok * D
    layer = (b * seq * (3 * D + 2 * kv + 3 * F / tp + routed) * dsize
             + b * H / tp * seq * seq * (4 + 4 + dsize))
    saved = L * b * seq * D * dsize if remat else L * layer
    logits = b * (logit_positions or seq) * V / tp * (dsize + 4 + 4)
    return int(saved + layer + logits)


def quantized_bytes(n: int, kind: str, rows: int, blocksize: int = 64) -> int:
    """Bytes of one weight of n elements as bitsandbytes stores it: 4-bit codes two a byte, one
    uint8 absmax code per block, a float32 absmax per 256 blocks and one float32 offset (double
    quantisation: 4 + 8/64 + 32/(64*256) = 4.127 bits a weight); int8: a byte a weight and a
    float32 scale per row."""
    if kind == "int8":
        return n + 4 * rows
    blocks = -(-n // blocksize)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4


def quantized_base_bytes(c: Any, kind: str, dsize: int) -> int:
    """Hand count of a Llama base with every linear kernel but the LM head quantised (per layer,
    each layer's kernels quantised on their own) and the rest dense in `dsize`-byte floats."""
    D, F, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    linears = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]  # (in, out)
    per_layer = sum(quantized_bytes(i * o, kind, o) for i, o in linears)
    dense = (2 * V * D + (2 * L + 1) * D) * dsize  # embedding, LM head, norms
    return L * per_layer + dense


def _quantized(params: Any, kind: str, repl: Any) -> tuple[Any, Any]:
    """Abstract quantised params (as load(quant=kind) builds them) and their shardings."""
    import functools

    import jax

    from lora_jax.models.hf_names import is_stacked
    from lora_jax.models.quantized import quantizable
    from lora_jax.paths import flat_paths, nest
    from lora_jax.quant import quantize

    flat = {}
    for path, x in flat_paths(params):
        if quantizable(path):
            stack = {"stack_axes": 1} if is_stacked(path) else {}  # a scanned [L, in, out] kernel
            one = functools.partial(quantize, kind=kind, transpose=True, **stack)
            q = jax.eval_shape(one, jax.ShapeDtypeStruct(x.shape, x.dtype))
            x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), q)
        flat[path] = x
    tree = nest(flat)
    return tree, jax.tree.map(lambda a: a.sharding, tree)


def plan(model: str, mesh_sizes: dict[str, int], rank: int = 16, batch: int = 8, seq: int = 2048,
         dtype: str = "bfloat16", targets: str = "all", remat: bool = True, scan: bool = True,
         quant: str | None = None, loss: str = "chunked", full: bool = True) -> dict:
    """Compile the LoRA and full steps (and QLoRA's with `quant`) for the mesh; their per-device
    bytes and the hand count. loss: "chunked", the trainer's causal-LM loss (the head applied
    per chunk of positions, lora_jax/models/lm_loss.py), or "plain" (whole fp32 logits)."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from benchmarks.common import optimizer_config
    from benchmarks.steps import lm_loss
    from lora_jax import sharding as shd
    from lora_jax.models import build_module
    from lora_jax.models.lm_loss import CHUNK_POSITIONS, next_token_fn
    from lora_jax.models.loading import LoadedModel, param_shapes
    from lora_jax.paths import flat_paths, nest
    from lora_jax.tasks.causal_lm import training_loss
    from lora_jax.train_step import TrainState, make_optimizer, make_train_step, model_apply

    mesh_sizes = {"data": 1, "fsdp": 1, "tensor": 1, **mesh_sizes}
    n = math.prod(mesh_sizes.values())
    if jax.device_count() < n:
        raise SystemExit(f"mesh needs {n} devices, JAX sees {jax.device_count()} "
                         "(run as `python -m benchmarks.plan`, which fakes them)")
    if "num_experts" in PRESETS[model]:
        if quant:
            raise SystemExit(f"--quant plans dense Llama presets only; {model} is a MoE")
        from benchmarks.moe_lowering import use_loop_lowering

        use_loop_lowering()  # XLA:CPU's own ragged_dot expands tokens against every expert
    mesh = shd.make_mesh(mesh_sizes, jax.devices()[:n])
    shd.check_batch(batch, 1, mesh)  # the trainer's own check: batch splits over data x fsdp
    _, module, c = build_module(hf_config(model), scan_layers=scan, remat=remat)
    placer, sds = shd.param_sharding(mesh), jax.ShapeDtypeStruct
    flat = {p: sds(s.shape, jnp.dtype(dtype), sharding=placer(p, s.shape))
            for p, s in flat_paths(param_shapes(module))}
    params = nest(flat)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    fn = lambda p, ids, mask: module.apply(p, ids, mask)
    names, loss_fn, positions = ("ids", "mask"), lm_loss, None
    if loss == "chunked":
        fn = next_token_fn(LoadedModel(fn, None, c, None, "llama", "", module, {}))
        names, loss_fn, positions = ("input_ids", "attention_mask"), training_loss, CHUNK_POSITIONS
    bsh, repl = shd.batch_sharding(mesh), shd.replicated(mesh)
    batch_ = {name: sds((batch, seq), jnp.int32, sharding=bsh) for name in names}
    tx, schedule = make_optimizer(optimizer_config(), 1000)
    spec = lora_jax.LoraSpec(targets=TARGETS[targets], rank=rank, alpha=2.0 * rank)
    out: dict[str, Any] = {"model": model, "mesh": mesh_sizes, "devices": n, "rank": rank,
                           "batch": batch, "seq": seq, "dtype": dtype, "targets": targets,
                           "remat": remat, "scan_layers": scan, "quant": quant, "loss": loss,
                           "config": PRESETS[model],
                           "params": lora_jax.count_params(params)}
    dsize = jnp.dtype(dtype).itemsize
    weights_dev = _per_device(params, param_sh)
    act = _activations(c, mesh_sizes, batch, seq, dsize, remat, positions)
    bases = {"lora": (params, param_sh)}
    if quant:
        bases["qlora"] = _quantized(params, quant, repl)
        out["hand_quantized_base_bytes"] = quantized_base_bytes(c, quant, dsize)
    for method in (("qlora",) if quant else ()) + ("lora",) + (("full",) if full else ()):
        t0 = time.perf_counter()
        if method != "full":
            frozen, frozen_sh = bases[method]
            adapters = jax.eval_shape(
                lambda p, b: lora_jax.init(jax.random.key(0), fn, p, *(b[k] for k in names), spec=spec),
                frozen, batch_)
            ad_sh = lora_jax.adapter_shardings(adapters, param_sh)
            trainable, tr_sh = {"adapters": adapters, "extra": {}}, {"adapters": ad_sh, "extra": {}}
        else:
            trainable, tr_sh, frozen, frozen_sh = params, param_sh, {}, {}
        opt = jax.eval_shape(tx.init, trainable)
        opt_sh = shd.like_params(opt, trainable, tr_sh, repl)  # as the trainer shards them
        rng = jax.eval_shape(lambda: jax.random.key(0))
        state = TrainState(step=sds((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=opt,
                           rng=rng)
        state_sh = TrainState(step=repl, trainable=tr_sh, frozen=frozen_sh, opt_state=opt_sh, rng=repl)
        state = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s), state, state_sh)
        step = make_train_step(model_apply(method.removeprefix("q"), fn), loss_fn, tx, schedule, 1,
                               use_rng=False)
        compiled = jax.jit(step, in_shardings=(state_sh, {k: bsh for k in batch_}),
                           out_shardings=(state_sh, repl), donate_argnums=0).lower(state, batch_).compile()
        mem = compiled.memory_analysis()
        tr_dev = _per_device(trainable, tr_sh)
        opt_dev = _per_device(opt, opt_sh)
        frozen_dev = _per_device(frozen, frozen_sh) if method != "full" else 0
        hand = {"weights": frozen_dev or weights_dev, "trainable": tr_dev, "optimizer": opt_dev,
                "gradients": tr_dev, "activations_est": act, "state_bytes": frozen_dev + tr_dev + opt_dev}
        hand["temp_est"] = hand["gradients"] + act
        out[method] = {"argument_bytes": int(mem.argument_size_in_bytes),
                       "temp_bytes": int(mem.temp_size_in_bytes),
                       "output_bytes": int(mem.output_size_in_bytes),
                       "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
                       "trainable_params": lora_jax.count_params(trainable),
                       "compile_s": time.perf_counter() - t0, "hand": hand}
        out[method]["total_bytes"] = out[method]["argument_bytes"] + out[method]["temp_bytes"]
    if full:
        out["lora_over_full"] = out["lora"]["total_bytes"] / out["full"]["total_bytes"]
    if quant:
        out["qlora_over_lora"] = out["qlora"]["total_bytes"] / out["lora"]["total_bytes"]
    return out


def table(res: dict) -> str:
    g = lambda n: f"{n / 2**30:8.2f}"
    lines = [f"{res['model']} ({res['params'] / 1e9:.2f}B params, {res['dtype']}), mesh {res['mesh']}, "
             f"batch {res['batch']} x seq {res['seq']}, LoRA r={res['rank']} on {res['targets']}, "
             f"remat={res['remat']}, {res['loss']} loss"
             f"{', QLoRA base ' + res['quant'] if res.get('quant') else ''}  -- GiB per device",
             f"{'':6}{'args':>9}{'temp':>9}{'total':>9} | hand: {'weights':>8}{'train':>8}{'optim':>8}"
             f"{'grads':>8}{'act':>8}"]
    methods = [m for m in ("qlora", "lora", "full") if m in res]
    for m in methods:
        r, h = res[m], res[m]["hand"]
        lines.append(f"{m:6}{g(r['argument_bytes'])} {g(r['temp_bytes'])} {g(r['total_bytes'])} |       "
                     f"{g(h['weights'])}{g(h['trainable'])}{g(h['optimizer'])}{g(h['gradients'])}"
                     f"{g(h['activations_est'])}")
    for m in methods:
        r, h = res[m], res[m]["hand"]
        lines.append(f"{m}: compiled args / hand-counted state (weights+trainable+optimizer) "
                     f"{r['argument_bytes'] / h['state_bytes']:.3f}; compiled temp / hand (grads + "
                     f"activations) {r['temp_bytes'] / h['temp_est']:.2f}")
    if "lora_over_full" in res:
        lines.append(f"LoRA / full per-device memory: {res['lora_over_full']:.3f}")
    if "qlora" in res:
        lines.append(f"QLoRA / LoRA per-device memory: {res['qlora_over_lora']:.3f}; quantised base "
                     f"{g(res['qlora']['hand']['weights']).strip()} GiB as built, "
                     f"{g(res['hand_quantized_base_bytes']).strip()} GiB by hand (4.127 bits a "
                     "quantised weight plus the dense rest)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=8 or data=2,fsdp=4,tensor=2")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--no-remat", action="store_true")
    parser.add_argument("--no-scan", action="store_true", help="unrolled layers (slow to compile)")
    parser.add_argument("--quant", default=None, choices=["nf4", "fp4", "int8"],
                        help="also plan QLoRA over a base quantised so")
    parser.add_argument("--loss", default="chunked", choices=["chunked", "plain"],
                        help="the trainer's chunked causal-LM loss, or whole fp32 logits")
    parser.add_argument("--no-full", action="store_true", help="plan the LoRA step(s) only")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    sizes = parse_mesh(args.mesh)
    if "jax" not in sys.modules:  # fake the mesh's devices before JAX starts
        n = math.prod(sizes.values())
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={n}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    res = plan(args.model, sizes, args.rank, args.batch, args.seq, args.dtype, args.targets,
               not args.no_remat, not args.no_scan, args.quant, args.loss, not args.no_full)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
