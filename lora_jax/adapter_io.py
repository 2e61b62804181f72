"""Saving an adapter tree as a self-describing Orbax directory: arrays plus `adapter.json`.

`adapter.json` holds each adapter's static layout (scale, axis groups) and the caller's info
(spec, base id, parameter counts), so `load_adapter` rebuilds the exact tree with no model at hand.
It also holds a checksum of every array (lora_jax/integrity.py); `load_adapter` refuses arrays
that do not match (damaged on disk) or cannot be read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lora_jax import integrity
from lora_jax.adapters import Adapter, adapter_items
from lora_jax.errors import LoraError
from lora_jax.paths import nest

PyTree = Any


def _layout(adapters: PyTree) -> dict[str, dict]:
    return {
        path: {
            "scale": ad.scale, "stack": list(ad.stack), "inputs": list(ad.inputs),
            "outputs": list(ad.outputs), "dropout": ad.dropout,
            "a_shape": list(ad.a.shape), "b_shape": list(ad.b.shape), "dtype": str(ad.a.dtype),
        }
        for path, ad in adapter_items(adapters)
    }


def save_adapter(directory: str, adapters: PyTree, info: dict | None = None) -> None:
    """Write `directory/arrays` (Orbax) and `directory/adapter.json` (layout and `info`)."""
    directory = os.path.abspath(directory)
    sums, _ = integrity.checksums(adapters)  # every process: one program over the sharded arrays
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(directory, "arrays"), adapters, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        meta = {"layout": _layout(adapters), "info": info or {},
                "integrity": {"algorithm": integrity.ALGORITHM, "checksums": sums}}
        tmp = os.path.join(directory, "adapter.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, default=str)
        os.replace(tmp, os.path.join(directory, "adapter.json"))


def read_info(directory: str) -> dict:
    path = os.path.join(directory, "adapter.json")
    if not os.path.exists(path):
        raise LoraError(f"no adapter at {directory}: expected {path} (written by save_adapter)")
    with open(path) as f:
        return json.load(f)


def load_adapter(directory: str, shardings: PyTree | None = None) -> tuple[PyTree, dict]:
    """(adapters, info) from a directory written by `save_adapter`; damaged arrays are refused."""
    meta = read_info(directory)
    abstract = {}
    for path, m in meta["layout"].items():
        a = jax.ShapeDtypeStruct(tuple(m["a_shape"]), m["dtype"])
        b = jax.ShapeDtypeStruct(tuple(m["b_shape"]), m["dtype"])
        abstract[path] = Adapter(a, b, m["scale"], tuple(m["stack"]), tuple(m["inputs"]),
                                 tuple(m["outputs"]), m["dropout"])
    abstract = nest(abstract)
    if shardings is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        )
    arrays = os.path.join(os.path.abspath(directory), "arrays")
    try:
        adapters = ocp.StandardCheckpointer().restore(arrays, abstract)
    except Exception as e:  # torn or damaged files: Orbax/TensorStore say which in many lines
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise LoraError(f"adapter arrays in {arrays} are unreadable ({type(e).__name__}: {first})") from None
    saved = meta.get("integrity", {}).get("checksums")
    wrong = [] if saved is None else integrity.mismatches(saved, adapters)  # older adapters: no sums
    if wrong:
        raise LoraError(f"adapter at {directory} is damaged: array {wrong[0]} does not match the checksum "
                        f"in its adapter.json{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}; "
                        "refusing to load it")
    return adapters, meta["info"]

