"""Adapter-only training checkpoints with Orbax: strict on restore, tolerant of a torn latest one.

A checkpoint holds the trainable tree, the optimizer state, the step and the data position, never
the frozen base. Its metadata carries a fingerprint of the base (source id, and the paths,
shapes and dtypes of its weights) and of the LoRA spec; restoring under a different fingerprint
is refused with what differs. It also carries a checksum of every saved array
(lora_jax/integrity.py), recomputed on restore: a checkpoint whose data was damaged on disk is
reported and set aside like an unreadable one, never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from lora_jax import integrity
from lora_jax.errors import LoraError
from lora_jax.paths import flat_paths

PyTree = Any


def base_fingerprint(params: PyTree, source: str) -> dict:
    """Which base a set of adapters belongs to: its source id and a hash of its weights' paths,
    shapes and dtypes (cheap: no weight values are read)."""
    structure = [(p, list(x.shape), str(x.dtype)) for p, x in flat_paths(params)]
    digest = hashlib.sha256(json.dumps(structure).encode()).hexdigest()[:16]
    return {"base_source": source, "base_structure": digest}


def fingerprint(params: PyTree, source: str, method: str, lora: dict | None) -> dict:
    return {**base_fingerprint(params, source), "method": method, "lora": lora}


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


class RunCheckpoints:
    """Keep-N, async, atomic checkpoints of one run in `directory`."""

    def __init__(self, directory: str, keep: int, fingerprint: dict):
        self.directory = os.path.abspath(directory)
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        # Plain per-array storage: OCDBT keeps a merged copy beside each process's own data,
        # which doubles a checkpoint on disk.
        handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=False),
                    "meta": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state: PyTree, data_position: int) -> None:
        sums, finite = integrity.checksums(state)
        meta = {"fingerprint": self.fingerprint, "data_position": data_position, "step": step,
                "integrity": {"algorithm": integrity.ALGORITHM, "checksums": sums, "finite": finite}}
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
        """The newest readable, undamaged checkpoint as (state, meta); None when there is none.

        Unreadable or damaged (checksum mismatch) newer checkpoints are reported in one line each
        and moved aside to `corrupt-<step>`, so the run can write those steps again.
        """
        steps = sorted(self._mngr.all_steps(), reverse=True)
        bad = []
        for step in steps:
            loaded = self._load(step, abstract_state)
            if loaded is None:
                bad.append(step)
                continue
            self._set_aside(bad)
            return loaded
        if steps:
            raise LoraError(f"no usable checkpoint in {self.directory} (steps {steps} are all "
                            "unreadable or damaged)")
        return None

    def last_good(self, abstract_state: PyTree) -> int | None:
        """The newest checkpoint that reads back, matches its checksums and holds only finite values
        (for naming after a NaN loss); waits for pending saves first."""
        self._mngr.wait_until_finished()
        for step in sorted(self._mngr.all_steps(), reverse=True):
            loaded = self._load(step, abstract_state)
            if loaded is not None and loaded[1].get("integrity", {}).get("finite", True):
                return step
        return None

    def _load(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
        """(state, meta) of `step`, or None (reported) if it cannot be read or fails its checksums."""
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            diff = differences(meta.get("fingerprint", {}), self.fingerprint)
            if diff:
                raise LoraError(
                    f"checkpoint {step} in {self.directory} is for another run: " + "; ".join(diff)
                )
            state = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state
        except LoraError:
            raise
        except Exception as e:  # a torn or corrupted checkpoint: report it, use an older one
            logging.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                            step, self.directory, type(e).__name__)
            return None
        saved = meta.get("integrity", {}).get("checksums")
        wrong = [] if saved is None else integrity.mismatches(saved, state)  # older runs: no sums
        if wrong:
            file = os.path.join(self.directory, str(step), "state", wrong[0].replace("/", "."))
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            logging.warning("checkpoint %d in %s is damaged: array %s%s (%s) does not match the "
                            "checksum saved with it; trying the previous one", step, self.directory,
                            wrong[0], more, file)
            return None
        return state, meta

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target, n = os.path.join(self.directory, f"corrupt-{step}"), 1
                while os.path.exists(target):  # damaged before: keep both
                    target, n = os.path.join(self.directory, f"corrupt-{step}.{n}"), n + 1
                os.replace(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:  # nobody re-lists the steps before process 0 has moved them
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"lora_jax checkpoint set aside {steps}")
        self._mngr.reload()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def process_zero() -> bool:
    return jax.process_index() == 0
