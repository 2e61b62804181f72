"""The trainability split that decides what is differentiated, held by the optimizer, saved and
how it is sharded.

Under LoRA, trainable = {"adapters": adapter tree, "extra": base weights trained in full (those
matching `lora.train_also`, e.g. a new classification head)} and frozen = the rest of the base.
Under full fine-tuning, trainable = the whole params tree and frozen = {}.
"""

from __future__ import annotations

import re
from typing import Any

from lora_jax.errors import LoraError
from lora_jax.paths import flat_paths, nest
from lora_jax.quant.weight import is_quantized

PyTree = Any


def partition(params: PyTree, pattern: str) -> tuple[dict, PyTree]:
    """(weights whose path matches `pattern`, the rest); with no pattern, ({}, params) untouched."""
    if not pattern:
        return {}, params
    flat = dict(flat_paths(params, is_leaf=is_quantized))
    chosen = {p for p in flat if re.fullmatch(pattern, p)}
    if not chosen:
        raise LoraError(f"lora.train_also {pattern!r} matches no parameter")
    frozen_q = sorted(p for p in chosen if is_quantized(flat[p]))
    if frozen_q:
        raise LoraError(f"lora.train_also {pattern!r} matches '{frozen_q[0]}', a quantised weight; "
                        "quantised weights stay frozen (match only dense ones)")
    return (nest({p: flat[p] for p in chosen}), nest({p: w for p, w in flat.items() if p not in chosen}))


def combine(frozen: PyTree, extra: dict) -> PyTree:
    """The full params tree for the model's forward."""
    if not extra:
        return frozen
    return nest({**dict(flat_paths(frozen, is_leaf=is_quantized)), **dict(flat_paths(extra))})


def adapters_of(trainable: PyTree) -> PyTree:
    """The adapter part of a LoRA trainable tree (the whole tree otherwise)."""
    is_lora = isinstance(trainable, dict) and set(trainable) == {"adapters", "extra"}
    return trainable["adapters"] if is_lora else trainable
