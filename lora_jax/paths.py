"""Parameter paths: the "/"-joined names that target regexes are matched against."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from lora_jax.errors import LoraError

PyTree = Any

# Trailing attribute names that only box a value (nnx Variables, penzai's Parameter values and
# NamedArrays); they are not part of a name.
_BOX_ATTRS = ("value", "raw_value", "data_array")


def _entry_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(key_path: Iterable[Any]) -> str:
    """`('params', 'Dense_0', 'kernel')`-style key path -> "params/Dense_0/kernel"."""
    names = [_entry_name(e) for e in key_path]
    while len(names) > 1 and names[-1] in _BOX_ATTRS:
        names.pop()
    return "/".join(names)


def flat_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """All leaves of `tree` with their path strings, in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in leaves]


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}; the adapter tree mirrors the params tree this way."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out


def array_paths(params: PyTree, abstract: bool = False) -> list[tuple[str, Any]]:
    """`flat_paths(params)`, refusing a leaf that is not an array (a function or string left in
    an unpartitioned module). `abstract` also admits `jax.ShapeDtypeStruct` leaves."""
    kinds = (jax.Array, np.ndarray, np.generic) + ((jax.ShapeDtypeStruct,) if abstract else ())
    flat = flat_paths(params)
    for path, leaf in flat:
        if not isinstance(leaf, kinds):
            kind = type(leaf).__qualname__
            if type(leaf).__module__ != "builtins":
                kind = f"{type(leaf).__module__}.{kind}"
            raise LoraError(
                f"params leaf '{path}' is a {kind}, "
                "not an array; pass only the arrays as params (e.g. eqx.partition(model, "
                "eqx.is_array)) and let fn close over the rest"
            )
    return flat
