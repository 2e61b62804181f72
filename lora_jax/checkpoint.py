"""Adapter-only training checkpoints with Orbax: strict on restore, tolerant of a torn latest one.

A checkpoint holds the trainable tree, the optimizer state, the step and the data position, never
the frozen base. Its metadata carries a fingerprint of the base (source id, and the paths,
shapes and dtypes of its weights) and of the LoRA spec; restoring under a different fingerprint
is refused with what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

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
        meta = {"fingerprint": self.fingerprint, "data_position": data_position, "step": step}
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
        """The newest readable checkpoint as (state, meta); None when there is none at all.

        Unreadable newer checkpoints are reported and moved aside to `corrupt-<step>`, so the run
        can write those steps again.
        """
        steps = sorted(self._mngr.all_steps(), reverse=True)
        bad = []
        for step in steps:
            try:
                meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                diff = differences(meta.get("fingerprint", {}), self.fingerprint)
                if diff:
                    raise LoraError(
                        f"checkpoint {step} in {self.directory} is for another run: " + "; ".join(diff)
                    )
                restored = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except LoraError:
                raise
            except Exception as e:  # a torn or corrupted checkpoint: report it, use an older one
                logging.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                                step, self.directory, type(e).__name__)
                bad.append(step)
                continue
            self._set_aside(bad)
            return restored.state, meta
        if steps:
            raise LoraError(f"no readable checkpoint in {self.directory} (steps {steps} all failed)")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if steps and jax.process_index() == 0:
            for step in steps:
                os.replace(os.path.join(self.directory, str(step)),
                           os.path.join(self.directory, f"corrupt-{step}"))
        if steps:
            self._mngr.reload()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def process_zero() -> bool:
    return jax.process_index() == 0
