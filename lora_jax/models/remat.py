"""Activation memory as a choice: what a layer keeps for the backward pass and what it recomputes.

    none                  keep everything (fastest when it fits)
    full                  keep only the layer's input; recompute the whole layer (least memory)
    save_dots             keep every weight matmul's output (no batch dims: the projections and
                          the adapters' x·A, not attention's scores), recompute the rest
    save_dots_except_mlp  keep the attention's projections and its output, recompute the MLP
                          (MaxText's `save_dot_except_mlp`; the MLP holds most activations)

`remat=True`/`False` from older code mean `full`/`none`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from lora_jax.errors import LoraError

POLICIES = ("none", "full", "save_dots", "save_dots_except_mlp")
ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "out_proj")


def policy_name(remat: Any) -> str:
    """The policy a `remat` value names: a bool (True = full) or one of POLICIES."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in POLICIES:
        raise LoraError(f"remat {remat!r} is not one of {POLICIES} (or True/False)")
    return remat


def _jax_policy(name: str) -> Any:
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "save_dots_except_mlp":
        return jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES)
    return None  # full: nothing saved


def wrap_layer(layer_cls: type[nn.Module], remat: Any, scan_layers: bool) -> type[nn.Module]:
    """The layer class under the policy; `prevent_cse` only where no scan already prevents it."""
    name = policy_name(remat)
    if name == "none":
        return layer_cls
    return nn.remat(layer_cls, prevent_cse=not scan_layers, policy=_jax_policy(name))


def tag(x: jax.Array, name: str) -> jax.Array:
    """Name an attention intermediate so `save_dots_except_mlp` can keep it (a no-op otherwise)."""
    assert name in ATTENTION_NAMES, name
    return checkpoint_name(x, name)
