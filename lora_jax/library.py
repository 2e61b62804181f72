"""A library of named adapters for one base: save, list, load (refusing the wrong base), swap.

Each adapter lives in <root>/<name>/ as written by `lora_jax.adapter_io.save_adapter`, with the
base's fingerprint and the spec in its adapter.json. Swapping two adapters of the same spec on a
jitted function does not recompile: shapes and static metadata (rank, scale, layout) are equal.
A different rank or scale (e.g. `combine.with_strength`) is a different static signature and
retraces once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lora_jax.adapter_io import load_adapter, read_info, save_adapter
from lora_jax.checkpoint import base_fingerprint, differences
from lora_jax.errors import LoraError
from lora_jax.spec import LoraSpec

PyTree = Any


class AdapterLibrary:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def _dir(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise LoraError(f"adapter name {name!r}: expected a plain, non-empty name")
        return os.path.join(self.root, name)

    def names(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root)
                      if os.path.exists(os.path.join(self.root, n, "adapter.json")))

    def save(self, name: str, adapters: PyTree, params: PyTree, source: str,
             spec: LoraSpec | None = None) -> str:
        """Store `adapters` (trained on `params` from `source`) under `name`; returns its directory."""
        spec_dict = None if spec is None else {
            k: v for k, v in dataclasses.asdict(spec).items() if k != "dtype"}
        info = {"name": name, "base": base_fingerprint(params, source), "spec": spec_dict}
        directory = self._dir(name)
        save_adapter(directory, adapters, info)
        return directory

    def load(self, name: str, params: PyTree, source: str, shardings: PyTree | None = None) -> PyTree:
        """The adapters saved as `name`, refused (saying what differs) if made for another base."""
        directory = self._dir(name)
        info = read_info(directory)["info"]
        diff = differences(info.get("base", {}), base_fingerprint(params, source))
        if diff:
            raise LoraError(f"adapter '{name}' was trained on another base: " + "; ".join(diff))
        adapters, _ = load_adapter(directory, shardings)
        return adapters
