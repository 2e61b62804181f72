"""`check_config(config, workdir)`: a whole run config held to configs/base.py before anything runs.

The trainer calls it first, so the CLI, the ablation runner and pretraining all get it. It
checks, stopping at the first problem with one LoraError line that names the field, its value
and what is allowed: every field is declared (no unknown or missing ones); every value passes
its declared rule (lora_jax/config_rules.py); the rules between fields; the paths the task will
read; and that the workdir can be made. It reads the filesystem but writes nothing.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_jax.config_rules import BASE_CONFIG, declared_fields
from lora_jax.errors import LoraError
from lora_jax.spec import changes_base

MODEL_PATH_UNUSED = ("planted_rank",)  # tasks that make their model from their own fields
SCRATCH_WHEN_EMPTY = ("causal_lm",)  # model.path "": a from-scratch model; else an exported base
MESH_AXES = ("data", "fsdp", "tensor")


def _fail(name: str, value: Any, expected: str) -> None:
    raise LoraError(f"{name}={value!r}; expected {expected}")


def flat_values(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"optimizer.lr": 0.001, ...}: every leaf of a ConfigDict (or dict) by its dotted name."""
    out = {}
    for key, value in node.items():
        if hasattr(value, "items"):
            out.update(flat_values(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_config(config: Any, workdir: str) -> None:
    """Raise LoraError for the first field, rule between fields, path or workdir that is wrong."""
    fields = declared_fields()
    values = flat_values(config)
    for name in values:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise LoraError(f"{name}={values[name]!r}: no such config field in {BASE_CONFIG.name}{hint}")
    for name, field in fields.items():
        if name not in values:
            raise LoraError(f"{name} is missing from the config; {BASE_CONFIG.name} declares it "
                            f"({field.rule.text})")
        if not field.rule.allows(values[name]):
            _fail(name, values[name], field.rule.expected)
    check_together(config)
    for name, field in fields.items():
        for kind in field.rule.kinds:
            if kind in _IN_CONTEXT:
                _IN_CONTEXT[kind](name, values[name], config)
    check_workdir(workdir)


def check_together(c: Any) -> None:
    """The rules that tie fields to each other (each value already passed its own rule)."""
    if c.batch_size % c.grad_accum:
        _fail("batch_size", c.batch_size, f"a multiple of grad_accum={c.grad_accum}")
    if c.steps > 0 and c.optimizer.warmup_steps >= c.steps:
        _fail("optimizer.warmup_steps", c.optimizer.warmup_steps, f"fewer than steps={c.steps}")
    if c.model.quant != "none" and c.method != "lora":
        _fail("model.quant", c.model.quant, "'none' with method='full': quantised weights are frozen")
    if changes_base(c.lora.init) and c.method != "lora":
        _fail("lora.init", c.lora.init, "'kaiming' or 'gaussian' with method='full' (PiSSA/OLoRA "
              "initialise LoRA factors, and full fine-tuning has none)")
    if changes_base(c.lora.init) and c.lora.get("dora", False):
        _fail("lora.init", c.lora.init, "'kaiming' or 'gaussian' with lora.dora=True (DoRA's magnitude "
              "would come from W, not from the residual PiSSA/OLoRA train on)")
    if changes_base(c.lora.init) and c.model.quant != "none":
        _fail("lora.init", c.lora.init, f"'kaiming' or 'gaussian' with model.quant={c.model.quant!r}: "
              "PiSSA/OLoRA subtract A₀B₀ from W and a quantised W is frozen codes (start dense)")
    if c.model.quant != "none" and c.task == "planted_rank":
        _fail("model.quant", c.model.quant, "'none' for planted_rank (its model is not a checkpoint)")
    auto = [a for a in MESH_AXES if c.mesh[a] == -1]
    if len(auto) > 1:
        _fail(f"mesh.{auto[1]}", -1, f"a size: only one mesh axis may be -1 and mesh.{auto[0]} is")
    if c.task == "planted_rank":
        p = c.planted_rank
        if p.planted_k > p.width:
            _fail("planted_rank.planted_k", p.planted_k, f"at most planted_rank.width={p.width}")
        names = [f"layers_{i}/{n}" for i in range(p.layers) for n in ("kernel", "bias")]
        hits = [n for n in names if re.fullmatch(p.planted, n)]
        if not hits or any(n.endswith("bias") for n in hits):
            _fail("planted_rank.planted", p.planted, "a regex matching some of the kernels "
                  f"layers_0/kernel .. layers_{p.layers - 1}/kernel and no bias")
    if c.task in SCRATCH_WHEN_EMPTY and not c.model.path:
        m = c.causal_lm
        if m.hidden_size % m.heads or (m.hidden_size // m.heads) % 2:
            _fail("causal_lm.heads", m.heads, f"a divisor of causal_lm.hidden_size={m.hidden_size} "
                  "that leaves an even head size (rotary embeddings split it in halves)")


def _model_path(name: str, path: str, c: Any) -> None:
    from lora_jax.models.loading import _HUB_ID  # the loader's own test of "org/name"

    if c.task in MODEL_PATH_UNUSED:
        return
    local = Path(path).expanduser()
    if c.task in SCRATCH_WHEN_EMPTY:
        if path and not (local / "config.json").is_file():
            raise LoraError(f"{name}={path!r}: no pretrained causal_lm base at {path}; make it first "
                            f"with: python -m experiments.pretrain --config={c.causal_lm.base_config}")
        return
    if not path:
        _fail(name, path, f"an HF model directory or hub id (task {c.task} loads one)")
    if local.is_dir() and not (local / "config.json").is_file():
        _fail(name, path, "an HF model directory (this one has no config.json)")
    if local.exists() and not local.is_dir():
        _fail(name, path, "an HF model directory or hub id (this is a file)")
    if not local.exists() and not _HUB_ID.fullmatch(path):
        _fail(name, path, "an HF model directory or hub id (no such directory)")


def _jsonl_file(name: str, path: str, c: Any) -> None:
    if not c.task.startswith("jsonl_"):
        return
    if not path:
        _fail(name, path, f"a .jsonl file (task {c.task} reads one; pass --config.{name}=FILE)")
    if Path(path).is_dir():
        _fail(name, path, "a .jsonl file (this is a directory)")
    if not Path(path).is_file():
        _fail(name, path, "a .jsonl file (no such file)")


def _config_file(name: str, value: str, c: Any) -> None:
    if c.task not in SCRATCH_WHEN_EMPTY:
        return
    file = value.split(":")[0]
    if not any((root / file).is_file() for root in (Path.cwd(), BASE_CONFIG.parents[1])):
        _fail(name, value, "a config file, FILE.py or FILE.py:VARIANT (no such file)")


# kind -> check that needs the task or the filesystem, run after every value passed its rule
_IN_CONTEXT: dict[str, Callable[[str, Any, Any], None]] = {
    "hf model": _model_path, "jsonl file": _jsonl_file, "config file": _config_file,
}


def check_workdir(workdir: Any) -> None:
    """The run directory is new or a directory, and the nearest existing ancestor is a
    directory this process can create entries in."""
    if not isinstance(workdir, (str, os.PathLike)) or not str(workdir):
        _fail("workdir", workdir, "a directory path")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        _fail("workdir", str(workdir), "a directory, new or a run's to resume (this is a file)")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        _fail("workdir", str(workdir), f"a directory path ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail("workdir", str(workdir), f"a directory path it may write in ({existing} is not writable)")
