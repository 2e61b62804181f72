"""`train_and_evaluate(config, workdir)`: the whole run, read top to bottom as a recipe.

mesh -> task (model + data) -> trainable split -> shardings -> state -> restore -> loop.
Everything a bad config can break is checked before the workdir is touched.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax import sharding as shd
from lora_jax.adapter_io import save_adapter, save_tree
from lora_jax.checkpoint import RunCheckpoints, fingerprint
from lora_jax.config_check import check_config
from lora_jax.errors import LoraError
from lora_jax.metrics import MetricWriter
from lora_jax.preemption import StopSignals, TrainingStopped, stop_message
from lora_jax.train_step import TrainState, make_optimizer, make_train_step, model_apply
from lora_jax.trainable import partition
from lora_jax.variants.job import base_for, exported, initial_factors, kept

# Fields a resumed run may change: how long it goes on and how often it reports.
RESUMABLE_CHANGES = ("resume", "steps", "epochs", "log_every", "eval_every", "eval_at_start", "ckpt_every",
                     "keep_checkpoints")
# Around each step call; tests put `jax.transfer_guard_host_to_device("disallow")` here to show
# that the step is fed device arrays only (a host array would be a blocking implicit copy).
STEP_GUARD = contextlib.nullcontext


def lora_spec(cfg: Any) -> lora_jax.LoraSpec:
    return lora_jax.LoraSpec(targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha, scaling=cfg.scaling,
                             init=cfg.init, dropout=cfg.dropout, dora=cfg.get("dora", False))


def build_task(config: Any, mesh: jax.sharding.Mesh, workdir: str):
    try:
        module = importlib.import_module(f"lora_jax.tasks.{config.task}")
    except ModuleNotFoundError:
        raise LoraError(f"unknown task {config.task!r}; expected a module in lora_jax/tasks") from None
    return module.build(config, shd.param_sharding(mesh), workdir)


def _check_workdir(workdir: str, config: Any) -> None:
    """Refuse a workdir that holds a run of a different config (unless resume=False)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    current = json.loads(config.to_json())
    for key in RESUMABLE_CHANGES:
        saved.pop(key, None)
        current.pop(key, None)
    if saved != current and config.resume:
        diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        raise LoraError(
            f"workdir {workdir} holds a run of a different config (differs in: {', '.join(diff)}); "
            "use another --workdir or pass --config.resume=False to start over there"
        )


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def train_and_evaluate(config: Any, workdir: str) -> dict:
    check_config(config, workdir)  # every field against configs/base.py, the paths, the workdir
    # SIGTERM/SIGINT are noted from here on (also while compiling): the loop then finishes the
    # current step, checkpoints it and stops (lora_jax/preemption.py).
    with StopSignals() as stop:
        return _run(config, workdir, stop)


def _run(config: Any, workdir: str, stop: StopSignals) -> dict:
    # ---- Mesh and the checks that need nothing else.
    mesh = shd.make_mesh(config.mesh)
    shd.check_batch(config.batch_size, config.grad_accum, mesh)
    # ---- Task: base params are created or loaded straight into their shardings.
    task = build_task(config, mesh, workdir)
    steps = config.steps or max(1, int(config.epochs * task.train_examples // config.batch_size))
    example = next(task.batches(0))
    # ---- Trainable split: adapters under LoRA, the whole params tree under full fine-tuning.
    param_sh = jax.tree.map(lambda x: x.sharding, task.params)
    if config.method == "lora":
        spec = lora_spec(config.lora)
        adapters = lora_jax.init(jax.random.fold_in(jax.random.key(config.seed), 1), task.fn, task.params,
                                 *task.inputs(example), spec=spec)
        initial = initial_factors(config.lora, adapters, param_sh)  # PiSSA/OLoRA's A₀, B₀; else None
        extra, frozen = partition(base_for(task.params, initial, param_sh), config.lora.train_also)
        extra_sh, frozen_sh = partition(param_sh, config.lora.train_also)
        trainable_sh = {"adapters": lora_jax.adapter_shardings(adapters, param_sh), "extra": extra_sh}
        trainable = {"adapters": shd.place(adapters, trainable_sh["adapters"]), "extra": extra}
        lora_fp = config.lora.to_dict()
    else:
        trainable, trainable_sh, frozen, frozen_sh, lora_fp = task.params, param_sh, {}, {}, None
        initial = None
    n_train, n_base = lora_jax.count_params(trainable), lora_jax.count_params(task.params)
    # ---- Optimizer state lives only on the trainable tree, sharded like it.
    tx, schedule = make_optimizer(config.optimizer, steps)
    repl = shd.replicated(mesh)
    opt_sh = shd.like_params(jax.eval_shape(tx.init, trainable), trainable, trainable_sh, repl)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    step0, rng = jax.jit(lambda: (jnp.int32(0), jax.random.fold_in(jax.random.key(config.seed), 2)),
                         out_shardings=(repl, repl))()
    state = TrainState(step=step0, trainable=trainable, frozen=frozen, opt_state=opt_state, rng=rng)
    state_sh = TrainState(step=repl, trainable=trainable_sh, frozen=frozen_sh, opt_state=opt_sh, rng=repl)
    batch_sh = {k: shd.batch_sharding(mesh) for k in example}
    # ---- The step: jitted once, explicit shardings, the state donated.
    if config.model.dropout and task.dropout_fn is None:
        raise LoraError(f"model.dropout=True, but task '{config.task}' has no model with its own dropout "
                        "(offered for BERT-family encoders in code_search)")
    apply_fn = model_apply(config.method, task.fn, task.dropout_fn)
    traces = []

    def traced_step(state, batch):
        traces.append(1)
        return step_fn(state, batch)

    step_fn = make_train_step(apply_fn, task.loss, tx, schedule, config.grad_accum,
                              use_rng=config.model.dropout
                              or (config.method == "lora" and config.lora.dropout > 0))
    options = task.compiler_options  # per-family XLA options (models/compile_options.py)
    train_step = jax.jit(traced_step, in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, repl), donate_argnums=0, compiler_options=options)
    forward = _make_forward(apply_fn, mesh, options)
    # ---- Workdir: only now, with everything validated, is anything written.
    _check_workdir(workdir, config)
    if not config.resume and os.path.exists(workdir) and jax.process_index() == 0:
        for name in ("ckpt", "adapter", "finetuned", "peft", "metrics.jsonl", "tb", "adapter.json"):
            path = os.path.join(workdir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=1))
        if task.save_cache is not None:
            task.save_cache(workdir)
    fp = fingerprint(task.params, task.source, config.method, lora_fp)
    ckpts = RunCheckpoints(os.path.join(workdir, "ckpt"), config.keep_checkpoints, fp)
    saved_sh = {"trainable": trainable_sh, "opt_state": opt_sh, "step": repl,
                **kept(None if initial is None else trainable_sh["adapters"])}
    saved = {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, **kept(initial)}
    restored = ckpts.restore(_abstract(saved, saved_sh)) if config.resume else None
    position = 0
    if restored is not None:
        tree, meta = restored
        if initial is not None:  # PiSSA/OLoRA: the residual from the checkpoint's own A₀, B₀
            initial = tree.pop("initial")
            state = state.replace(frozen=partition(base_for(task.params, initial, param_sh),
                                                   config.lora.train_also)[1])
        state = state.replace(**tree)
        position = meta["data_position"]
    start = int(shd.to_host(state.step))
    writer = MetricWriter(workdir, steps, start)
    setup = {"setup/trainable_params": n_train, "setup/base_params": n_base,
             "setup/trainable_fraction": n_train / max(n_base, 1),
             "setup/trainable_bytes": sum(x.nbytes for x in jax.tree.leaves(trainable)),
             "setup/devices": jax.device_count(), "setup/processes": jax.process_count(),
             "setup/mesh": json.dumps(dict(mesh.shape)), "setup/steps": steps}
    if start == 0:
        writer.write(0, setup)
    writer.message(f"{config.method}: {n_train:,} trainable of {n_base:,} base params "
                   f"({100 * n_train / max(n_base, 1):.3f}%), mesh {dict(mesh.shape)}, "
                   f"{'resuming at step ' + str(start) if start else 'from scratch'}")

    def evaluate(step: int) -> dict:
        host_trainable = jax.tree.map(shd.to_host, exported(state.trainable, initial))
        res = task.evaluate(lambda *inputs: forward(state.trainable, state.frozen, *inputs), host_trainable)
        row = {f"eval/{k}": float(v) for k, v in res.items()}
        writer.write(step, row)
        writer.message(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return row

    # ---- The loop. On SIGTERM/SIGINT: finish the step, checkpoint it, stop.
    last_eval = evaluate(0) if start == 0 and config.eval_at_start else {}
    # The host never waits between log steps: batches are placed one step early, metrics stay on
    # device until a log step reads them, nothing else is read back (tests/test_host_loop.py).
    batches = shd.device_batches(task.batches(position), batch_sh)
    t0, done_since = time.perf_counter(), start

    def saved_tree() -> dict:
        return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step,
                **kept(initial)}

    for step in range(start, steps):
        batch = next(batches)
        with STEP_GUARD():
            state, metrics = train_step(state, batch)
        position += 1
        done = step + 1
        if done % config.log_every == 0 or done == steps:
            row = {k: float(shd.to_host(v)) for k, v in metrics.items()}
            if not math.isfinite(row["loss"]):
                good = ckpts.last_good(_abstract(saved_tree(), saved_sh))  # read back and verified
                ckpts.close()
                good = "none" if good is None else f"step {good} in {ckpts.directory}"
                raise LoraError(f"loss is {row['loss']} at step {done}; last good checkpoint: {good}")
            elapsed = time.perf_counter() - t0
            row["examples_per_s"] = (done - done_since) * config.batch_size / elapsed
            row["step_time_s"] = elapsed / (done - done_since)
            writer.write(done, row)
            writer.progress(done, row["loss"], row["examples_per_s"])
            t0, done_since = time.perf_counter(), done
        periodic = done % config.ckpt_every == 0 or done == steps
        if periodic:
            ckpts.save(done, saved_tree(), position)
        signum = stop.agreed(last=done == steps)
        if signum:
            if not periodic:
                ckpts.save(done, saved_tree(), position)
            ckpts.close()  # waits for the save
            writer.close()
            raise TrainingStopped(stop_message(signum, done, ckpts.directory), signum, done)
        if config.eval_every and done % config.eval_every == 0 and done != steps:
            last_eval = evaluate(done)
    if start < steps or not last_eval:
        last_eval = evaluate(steps)
    ckpts.close()
    # ---- Export the final trainable tree with its description.
    info = {"method": config.method, "base_source": task.source, "fingerprint": fp,
            "lora": lora_fp, "trainable_params": n_train, "base_params": n_base, "steps": steps,
            "eval": last_eval}
    out_dir = os.path.join(workdir, "adapter" if config.method == "lora" else "finetuned")
    final = exported(state.trainable, initial)  # PiSSA/OLoRA: the rank-2r LoRA on the original base
    if config.method == "lora":
        save_adapter(out_dir, final["adapters"], info)
        if final["extra"]:
            save_tree(os.path.join(out_dir, "extra"), final["extra"])
    else:
        save_tree(out_dir, state.trainable)
    # Beside it, for HF-model tasks, the same adapter in PEFT's format (<workdir>/peft).
    from lora_jax.run_export import write_run_peft

    peft_note = write_run_peft(workdir, config, task, final)
    if peft_note:
        writer.message(peft_note)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "adapter.json"), "w") as f:
            json.dump(info, f, indent=1)
    writer.close()
    return {"steps": steps, "start_step": start, "eval": last_eval, "step_traces": len(traces),
            "trainable": final, "workdir": workdir}


def _make_forward(apply_fn, mesh, compiler_options=None):
    """forward(trainable, frozen, *numpy inputs) -> numpy outputs, batch-sharded, jitted once per shape."""
    jitted = jax.jit(lambda tr, fr, *inputs: apply_fn(tr, fr, *inputs), compiler_options=compiler_options)
    batch_sh = shd.batch_sharding(mesh)
    shards = batch_sh.mesh.shape["data"] * batch_sh.mesh.shape["fsdp"]

    def forward(trainable, frozen, *inputs):
        n = inputs[0].shape[0]
        pad = (-n) % shards
        padded = [np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x for x in inputs]
        out = jitted(trainable, frozen, *(shd.to_device(x, batch_sh) for x in padded))
        return jax.tree.map(lambda y: shd.to_host(y)[:n], out)

    return forward
