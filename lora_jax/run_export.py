"""A training run's result in Hugging Face forms: a PEFT adapter directory, or merged full weights.

    export_run(workdir, "peft" | "merged", out) -> one line saying what was written

The run's model is rebuilt from its config.json the way the trainer built it (same task,
model.path, dtype, layer layout), on one device. The trained weights come from `adapter/`
(`finetuned/` for method=full) when the run finished, else from its newest usable checkpoint.
Output goes to a temporary sibling that is renamed into place, so a failure leaves nothing.

Which runs have which form:
  - PEFT holds LoRA factors only. A run that also trained base weights in full (`lora.train_also`,
    PEFT's modules_to_save, which lora_jax.peft does not write) or every weight (method=full) has
    no PEFT form; `merged` covers both. A base made from scratch has no directory to point at.
  - Both need the task to train a Hugging Face architecture as it is (`Task.hf_model`); the
    MLP of planted_rank or jsonl_classification's headed model have neither form.
  - A PiSSA/OLoRA run (lora.init) is read as the rank-2r plain LoRA on the original base, the
    form its adapter/ already holds; its checkpoints are converted with their A₀, B₀
    (lora_jax/variants/job.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

import lora_jax
from lora_jax import sharding as shd
from lora_jax.adapter_io import load_adapter, load_tree
from lora_jax.adapters import adapter_items
from lora_jax.errors import LoraError
from lora_jax.paths import flat_paths
from lora_jax.spec import changes_base
from lora_jax.variants.job import exported

FORMS = ("peft", "merged")
PEFT_DIR = "peft"  # the main job's PEFT copy, beside adapter/


@dataclasses.dataclass
class TrainedRun:
    """What a run trained: `trainable` is {"adapters", "extra"} under LoRA, the params under full."""

    config: Any
    task: Any
    trainable: Any
    step: int
    from_checkpoint: bool


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    if not os.path.isdir(workdir):
        raise LoraError(f"no run directory at {workdir}")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise LoraError(f"{workdir} is not a run directory (no config.json, which experiments.train writes)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _final_dir(workdir: str, config: Any) -> str:
    return os.path.join(workdir, "adapter" if config.method == "lora" else "finetuned")


def _finished(workdir: str, config: Any) -> bool:
    """adapter.json is the trainer's last write; the weights directory must still be there."""
    marker = os.path.join(workdir, "adapter.json")
    return os.path.isfile(marker) and os.path.isdir(_final_dir(workdir, config))


def _has_checkpoint(workdir: str) -> bool:
    ckpt = os.path.join(workdir, "ckpt")
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def config_refusal(config: Any, to: str) -> str | None:
    """Why this run's config has no `to` form (None when it may have one)."""
    if to == "peft" and config.method == "full":
        return ("the run fine-tuned every weight (method=full) and PEFT holds LoRA adapters only; "
                "--to merged exports the fine-tuned weights")
    if to == "peft" and config.lora.train_also:
        return (f"the run also trained base weights in full (lora.train_also={config.lora.train_also!r}) "
                "and PEFT's modules_to_save is not supported; --to merged exports all of it")
    return None


def task_refusal(config: Any, task: Any, to: str) -> str | None:
    """Why this task's model has no `to` form (None when it has one)."""
    model = task.hf_model
    if model is None:
        kept = ("adapter/ (lora_jax.adapter_io.load_adapter)" if config.method == "lora"
                else "finetuned/ (lora_jax.adapter_io.load_tree)")
        return (f"task {config.task}'s model ({task.source}) is not a Hugging Face model as it is; "
                "peft and merged exist for code_search, jsonl_sft and causal_lm runs; this run's "
                f"weights are in its {kept}")
    if to == "peft" and not model.source:
        return ("the base was made from scratch by the task, so a PEFT adapter has no base "
                "directory to point at; --to merged exports base + adapter as a full model")
    return None


def _one_device_task(config: Any, workdir: str) -> Any:
    """(mesh, task) on one device; the task reads what it cached in the workdir."""
    from lora_jax.trainer import build_task

    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return mesh, build_task(config, mesh, workdir)


def _placed(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _abstract_trainable(config: Any, task: Any) -> Any:
    """The trainable tree's structure, as the trainer makes it (values are placeholders)."""
    from lora_jax.trainable import partition
    from lora_jax.trainer import lora_spec

    if config.method == "full":
        return task.params
    example = next(task.batches(0))
    spec = dataclasses.replace(lora_spec(config.lora), init="kaiming")  # shapes only: no SVD/QR
    adapters = lora_jax.init(jax.random.key(0), task.fn, task.params, *task.inputs(example), spec=spec)
    extra, _ = partition(task.params, config.lora.train_also)
    return {"adapters": adapters, "extra": extra}


def _from_checkpoint(workdir: str, config: Any, task: Any, trainable: Any, sharding: Any) -> tuple[Any, int]:
    from lora_jax.checkpoint import RunCheckpoints, fingerprint
    from lora_jax.train_step import make_optimizer

    steps = config.steps or max(1, int(config.epochs * task.train_examples // config.batch_size))
    tx, _ = make_optimizer(config.optimizer, steps)
    tree = {"trainable": trainable, "opt_state": jax.eval_shape(tx.init, trainable),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if config.method == "lora" and changes_base(config.lora.init):  # PiSSA/OLoRA keep A₀, B₀
        tree["initial"] = trainable["adapters"]
    abstract = _placed(tree, sharding)
    fp = fingerprint(task.params, task.source, config.method,
                     config.lora.to_dict() if config.method == "lora" else None)
    ckpts = RunCheckpoints(os.path.join(workdir, "ckpt"), config.keep_checkpoints, fp)
    try:
        restored = ckpts.restore(abstract)
    finally:
        ckpts.close()
    if restored is None:
        raise LoraError(f"run {workdir} has no usable checkpoint in {ckpts.directory}")
    state, meta = restored
    return exported(state["trainable"], state.get("initial")), int(meta["step"])


def read_run(workdir: str, to: str) -> TrainedRun:
    """The run's config, rebuilt task and trained tree; refuses early what `to` cannot export."""
    config = load_run_config(workdir)
    reason = config_refusal(config, to)
    if reason:
        raise LoraError(f"run {workdir} has no {to} form: {reason}")
    finished = _finished(workdir, config)
    if not finished and not _has_checkpoint(workdir):
        raise LoraError(f"run {workdir} has neither {_final_dir(workdir, config)} nor a checkpoint in "
                        f"{os.path.join(workdir, 'ckpt')}: nothing trained to export")
    mesh, task = _one_device_task(config, workdir)
    reason = task_refusal(config, task, to)
    if reason:
        raise LoraError(f"run {workdir} has no {to} form: {reason}")
    abstract = _abstract_trainable(config, task)
    repl = shd.replicated(mesh)
    if not finished:
        trainable, step = _from_checkpoint(workdir, config, task, abstract, repl)
        return TrainedRun(config, task, trainable, step, from_checkpoint=True)
    final = _final_dir(workdir, config)
    with open(os.path.join(workdir, "adapter.json")) as f:
        step = int(json.load(f)["steps"])
    if config.method == "full":
        return TrainedRun(config, task, load_tree(final, _placed(abstract, repl)), step, False)

    adapters, _ = load_adapter(final, jax.tree.map(lambda _: repl, abstract["adapters"]))
    extra = {}
    if abstract["extra"]:
        extra = load_tree(os.path.join(final, "extra"), _placed(abstract["extra"], repl))
    return TrainedRun(config, task, {"adapters": adapters, "extra": extra}, step, False)


def merged_params(run: TrainedRun) -> Any:
    """Base + ΔW (and any train_also weights) under LoRA; the fine-tuned params under full."""
    from lora_jax.trainable import combine

    if run.config.method == "full":
        params = run.trainable
    else:
        params = lora_jax.merge(combine(run.task.params, run.trainable["extra"]), run.trainable["adapters"])
    ours = {p for p, _ in flat_paths(params)}
    theirs = {p for p, _ in flat_paths(run.task.hf_model.params)}
    if ours != theirs:
        odd = sorted(ours ^ theirs)[0]
        raise LoraError(f"the run's weights are not those of its Hugging Face model (e.g. '{odd}')")
    return params


def _write_atomically(out: str, write) -> None:
    """write(tmp_dir) fills a temporary directory next to `out`, which is then renamed to `out`."""
    out = os.path.abspath(out)
    anchor = os.path.dirname(out)
    while not os.path.isdir(anchor):
        anchor = os.path.dirname(anchor)
    tmp = os.path.join(anchor, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export of this pid
    os.makedirs(tmp)
    try:
        write(tmp)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        elif os.path.isdir(out):  # the main job's own peft/: replaced whole
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_peft(out: str, adapters: Any, model: Any, rslora: bool) -> None:
    from lora_jax import peft

    _write_atomically(out, lambda tmp: peft.save_adapter(tmp, adapters, model, rslora=rslora))


def write_merged(out: str, params: Any, model: Any, tokenizer: Any = None) -> None:
    """save_pretrained, plus the task's tokenizer when the base had no directory to copy it from."""
    from lora_jax.models import save_pretrained

    def write(tmp):
        save_pretrained(model, params, tmp)
        if not os.path.exists(os.path.join(tmp, "tokenizer.json")) and hasattr(tokenizer, "save"):
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))

    _write_atomically(out, write)


def check_out(out: str) -> None:
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise LoraError(f"--out {out} exists and is not empty; give a new or empty directory")


def export_run(workdir: str, to: str, out: str) -> str:
    """Write the run's `to` form into `out`; returns one line saying what was exported."""
    if to not in FORMS:
        raise LoraError(f"--to {to!r}: expected one of {', '.join(FORMS)}")
    check_out(out)
    run = read_run(workdir, to)
    model = run.task.hf_model
    if to == "peft":
        write_peft(out, run.trainable["adapters"], model, run.config.lora.scaling == "rslora")
    else:
        write_merged(out, merged_params(run), model, run.task.tokenizer)
    origin = (f"the latest checkpoint, step {run.step} (the run has not finished)" if run.from_checkpoint
              else f"the finished run (step {run.step})")
    return f"{to} export of {workdir} from {origin} written to {out}"


def write_run_peft(workdir: str, config: Any, task: Any, trainable: Any) -> str | None:
    """The main job's PEFT copy in <workdir>/peft (process 0 writes); a line to report, or None.

    Nothing is written (and a stale copy is removed) where PEFT does not apply: method=full,
    train_also weights, a model that is not an HF base loaded from a directory.
    """
    target = os.path.join(workdir, PEFT_DIR)
    applies = config.method == "lora" and task_refusal(config, task, "peft") is None
    reason = config_refusal(config, "peft") if applies else None  # train_also: said, not silent
    if applies and reason is None:
        adapters = jax.tree.map(shd.to_host, trainable["adapters"])  # every process joins the gather
    if jax.process_index() != 0:
        return None
    if not applies or reason is not None:
        shutil.rmtree(target, ignore_errors=True)
        return None if reason is None else f"no PEFT copy in {target}: {reason}"
    try:
        write_peft(target, adapters, task.hf_model, config.lora.scaling == "rslora")
    except LoraError as e:
        shutil.rmtree(target, ignore_errors=True)
        return f"no PEFT copy in {target}: {e}"
    if any(ad.is_dora for _, ad in adapter_items(adapters)):
        return (f"PEFT DoRA adapter (PeftModel.from_pretrained; vLLM does not serve DoRA, "
                f"experiments.export --to=merged makes a model it does) in {target}")
    return f"PEFT adapter (PeftModel.from_pretrained, vLLM) in {target}"
