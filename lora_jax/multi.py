"""Many adapters on one base: a stack of K adapters served to a mixed batch in one call.

`stack_adapters` turns K adapter trees of the same targets and layout into one tree whose A and
B carry a leading adapter axis; `lora_jax.apply(..., adapter_index=idx)` then gives example b
the adapter idx[b] (-1: none) by gathering its rows of A and B inside the factored branch
(the BGMV idea of Punica and S-LoRA): one compiled call, no W + ΔW, no loop over adapters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from lora_jax.adapters import Adapter, adapter_items
from lora_jax.errors import LoraError
from lora_jax.paths import nest

PyTree = Any


def _layout(ad: Adapter) -> tuple:
    """What must agree for two adapters to share a stack: axis groups and every non-rank size."""
    return ad.stack, ad.inputs, ad.outputs, tuple(ad.a.shape[:-1]), tuple(ad.b.shape[len(ad.stack) + 1:])


def stack_adapters(adapter_trees: Sequence[PyTree]) -> PyTree:
    """One stacked tree from K trees. Ranks may differ: the smaller are zero-padded to the largest
    (zero rank components add nothing). Each adapter's scale is folded into its B, so the stack
    has scale 1 and adapters trained with different α or scaling rules mix freely."""
    if not adapter_trees:
        raise LoraError("stack_adapters needs at least one adapter tree")
    items = [dict(adapter_items(t)) for t in adapter_trees]
    paths = sorted(items[0])
    for i, it in enumerate(items[1:], start=1):
        if sorted(it) != paths:
            diff = sorted(set(it) ^ set(paths))
            raise LoraError(f"adapter {i} targets other weights than adapter 0 (differ: {', '.join(diff)})")
    for i, it in enumerate(items):
        dora = sorted(p for p, ad in it.items() if ad.is_dora)
        if dora:
            raise LoraError(f"adapter {i} is DoRA (at '{dora[0]}'); a mixed-adapter batch serves plain "
                            "LoRA adapters only, as in PEFT; apply a DoRA adapter alone or merge it")
    out = {}
    for path in paths:
        ads = [it[path] for it in items]
        for i, ad in enumerate(ads[1:], start=1):
            if _layout(ad) != _layout(ads[0]):
                raise LoraError(f"adapter {i} lays out '{path}' differently from adapter 0")
        r = max(ad.rank for ad in ads)
        n_stack = len(ads[0].stack)
        a = [jnp.pad(ad.a, [(0, 0)] * (ad.a.ndim - 1) + [(0, r - ad.rank)]) for ad in ads]
        b = [jnp.pad(ad.b * ad.scale, [(0, 0)] * n_stack + [(0, r - ad.rank)] +
                     [(0, 0)] * len(ad.outputs)) for ad in ads]
        out[path] = dataclasses.replace(ads[0], a=jnp.stack(a), b=jnp.stack(b), scale=1.0)
    return nest(out)
