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
            "m_shape": None if ad.m is None else list(ad.m.shape),  # DoRA's magnitude
            "m_dtype": None if ad.m is None else str(ad.m.dtype),
        }
        for path, ad in adapter_items(adapters)
    }


def _save_arrays(directory: str, tree: PyTree) -> dict:
    """Orbax arrays in `directory` plus the integrity record to keep beside them."""
    sums, _ = integrity.checksums(tree)  # every process: one program over the sharded arrays
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory, tree, force=True)
    ckptr.wait_until_finished()
    return {"algorithm": integrity.ALGORITHM, "checksums": sums}


def _write_json(path: str, meta: dict) -> None:
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def _restore_arrays(arrays: str, abstract: PyTree | None, saved: dict | None, what: str) -> PyTree:
    """Read `arrays` back and hold them to the checksums in `saved` (None: written before them)."""
    try:
        tree = ocp.StandardCheckpointer().restore(arrays, abstract)
    except Exception as e:  # torn or damaged files: Orbax/TensorStore say which in many lines
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise LoraError(f"{what} arrays in {arrays} are unreadable ({type(e).__name__}: {first})") from None
    wrong = [] if saved is None else integrity.mismatches(saved.get("checksums", {}), tree)
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise LoraError(f"{what} at {os.path.dirname(arrays)} is damaged: array {wrong[0]} does not match "
                        f"the checksum saved with it{more}; refusing to load it")
    return tree


def save_adapter(directory: str, adapters: PyTree, info: dict | None = None) -> None:
    """Write `directory/arrays` (Orbax) and `directory/adapter.json` (layout and `info`)."""
    directory = os.path.abspath(directory)
    record = _save_arrays(os.path.join(directory, "arrays"), adapters)
    _write_json(os.path.join(directory, "adapter.json"),
                {"layout": _layout(adapters), "info": info or {}, "integrity": record})


def save_tree(directory: str, tree: PyTree) -> None:
    """Any array tree (train_also weights, a full fine-tune) as `directory/arrays` + `tree.json`
    with its checksums, read back by `load_tree`."""
    directory = os.path.abspath(directory)
    record = _save_arrays(os.path.join(directory, "arrays"), tree)
    _write_json(os.path.join(directory, "tree.json"), {"integrity": record})


def load_tree(directory: str, abstract: PyTree | None = None) -> PyTree:
    """The tree `save_tree` wrote (shaped and placed like `abstract` if given); damaged arrays are refused."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, "tree.json")
    if not os.path.exists(path):
        raise LoraError(f"no saved tree at {directory}: expected {path} (written by save_tree)")
    with open(path) as f:
        record = json.load(f)["integrity"]
    return _restore_arrays(os.path.join(directory, "arrays"), abstract, record, "saved tree")


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
        mag = None if m.get("m_shape") is None else jax.ShapeDtypeStruct(tuple(m["m_shape"]), m["m_dtype"])
        abstract[path] = Adapter(a, b, m["scale"], tuple(m["stack"]), tuple(m["inputs"]),
                                 tuple(m["outputs"]), m["dropout"], mag)
    abstract = nest(abstract)
    if shardings is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        )
    arrays = os.path.join(os.path.abspath(directory), "arrays")
    adapters = _restore_arrays(arrays, abstract, meta.get("integrity"), "adapter")
    return adapters, meta["info"]

