"""Run a sweep: one training run per override dict, each in DIR/runs/<name>, resumable.

A run whose `adapter.json` exists is finished and is not run again (it is read back from disk),
so an interrupted sweep picks up where it stopped; an unfinished run resumes from its own
checkpoint inside `train_and_evaluate`. Everything the reports need is read from the run
directories, so a rerun and a first run produce the same tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from lora_jax.errors import LoraError

RESERVED = ("name", "tags")  # keys of a sweep entry that are not config overrides


@dataclasses.dataclass
class RunRecord:
    """One finished run as read back from its directory."""

    name: str
    tags: dict[str, Any]
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict
    workdir: str
    info: dict[str, Any]  # the run's adapter.json (eval, trainable_params, steps, ...)
    metrics: list[dict[str, Any]]  # metrics.jsonl rows
    seconds: float | None  # wall time of the training call, when this sweep ran it
    skipped: bool  # True when it was already finished before this sweep started

    @property
    def eval(self) -> dict[str, float]:
        return self.info.get("eval", {})

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric over training, e.g. "loss" or "grad_norm_b"."""
        rows = [r for r in self.metrics if isinstance(r.get(key), (int, float))]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]

    def first_eval(self) -> dict[str, float]:
        """The step-0 evaluation (the base model before any training)."""
        for r in self.metrics:
            if r["step"] == 0 and any(k.startswith("eval/") for k in r):
                return {k: v for k, v in r.items() if k.startswith("eval/")}
        return {}


def overrides_of(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in RESERVED}


def run_name(entry: dict[str, Any]) -> str:
    """The entry's "name", or one made from its overrides; safe as a directory name."""
    name = entry.get("name") or "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides_of(entry).items())
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "-", str(name)) or "base"
    return name


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """An unlocked copy of `base` with dotted keys ("lora.rank") set; unknown keys are errors."""
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise LoraError(f"sweep override {key!r}: the run config has no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise LoraError(f"sweep override {key!r}: the run config has no field {leaf!r}")
        try:
            node[leaf] = value
        except TypeError as e:
            raise LoraError(f"sweep override {key}={value!r}: {e}") from None
    return config


def check_sweep(sweep: list[dict[str, Any]]) -> None:
    names = [run_name(e) for e in sweep]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LoraError(f"sweep has duplicate run names {dup}; give those entries distinct 'name's")


def _finished_config_matches(run_dir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    current = json.loads(config.to_json())
    if saved != current:
        diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        raise LoraError(
            f"finished run {run_dir} was made with a different config (differs in: {', '.join(diff)}); "
            "use another --workdir or delete that run directory"
        )


def read_run(
    run_dir: str,
    name: str,
    entry: dict[str, Any],
    config: ml_collections.ConfigDict,
    seconds: float | None,
    skipped: bool,
) -> RunRecord:
    with open(os.path.join(run_dir, "adapter.json")) as f:
        info = json.load(f)
    metrics = []
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(mpath):
        with open(mpath) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    if seconds is None:
        tpath = os.path.join(run_dir, "ablate_time.json")
        if os.path.exists(tpath):
            with open(tpath) as f:
                seconds = json.load(f).get("seconds")
    return RunRecord(
        name=name,
        tags=dict(entry.get("tags", {})),
        overrides=overrides_of(entry),
        config=config,
        workdir=run_dir,
        info=info,
        metrics=metrics,
        seconds=seconds,
        skipped=skipped,
    )


def run_sweep(
    base: ml_collections.ConfigDict,
    sweep: list[dict[str, Any]],
    workdir: str,
    train: Callable[[Any, str], dict] | None = None,
    log: Callable[[str], None] = print,
) -> list[RunRecord]:
    """Train every entry not yet finished, then read all of them back in sweep order."""
    if train is None:
        from lora_jax.trainer import train_and_evaluate as train
    check_sweep(sweep)
    configs = [apply_overrides(base, overrides_of(e)) for e in sweep]  # all errors before any run
    records = []
    for i, (entry, config) in enumerate(zip(sweep, configs)):
        name = run_name(entry)
        run_dir = os.path.join(workdir, "runs", name)
        done = os.path.exists(os.path.join(run_dir, "adapter.json"))
        seconds = None
        if done:
            _finished_config_matches(run_dir, config)
            log(f"[{i + 1}/{len(sweep)}] {name}: finished earlier, skipped")
        else:
            log(f"[{i + 1}/{len(sweep)}] {name}: training")
            t0 = time.perf_counter()
            train(config, run_dir)
            seconds = time.perf_counter() - t0
            with open(os.path.join(run_dir, "ablate_time.json"), "w") as f:
                json.dump({"seconds": seconds}, f)
        records.append(read_run(run_dir, name, entry, config, seconds, skipped=done))
    return records
