"""PiSSA/OLoRA adapters as a plain LoRA on the ORIGINAL base, for PEFT, vLLM and everything else.

Trained on the residual W_res = W − s·A₀·B₀, the adapted weight is W_res + s·A·B
= W + s·(A·B − A₀·B₀) = W + s·[A | A₀]·[B ; −B₀]: a rank-2r adapter with the same scale s, as
PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` writes it (its lora_A' =
[A; A₀] and lora_B' = [B | −B₀] are these, transposed). Our Adapter keeps s itself, so nothing
is rescaled here; `lora_jax.peft.save_adapter` then writes r' = 2r and lora_alpha = s·2r = 2α
(s·√(2r) = √2·α under rsLoRA), which PEFT turns back into the same s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from lora_jax.adapters import adapter_items
from lora_jax.errors import LoraError
from lora_jax.paths import nest

PyTree = Any


def to_plain_lora(adapters: PyTree, initial: PyTree) -> PyTree:
    """Rank-2r adapters that give the original base what `adapters` give the residual base made
    from `initial` (`lora_jax.residual_base(params, initial)`): A' = [A | A₀], B' = [B ; −B₀]
    along the rank axis, scale and layout unchanged, in the trained adapters' dtype."""
    trained, start = dict(adapter_items(adapters)), dict(adapter_items(initial))
    if sorted(trained) != sorted(start):
        odd = sorted(set(trained) ^ set(start))[0]
        raise LoraError(f"to_plain_lora: the trained and initial adapters differ in targets (e.g. '{odd}')")
    out = {}
    for path, ad in trained.items():
        a0 = start[path]
        same = (ad.scale, ad.stack, ad.inputs, ad.outputs, ad.a.shape, ad.b.shape) == (
            a0.scale, a0.stack, a0.inputs, a0.outputs, a0.a.shape, a0.b.shape)
        if not same:
            raise LoraError(f"to_plain_lora: the initial adapter of '{path}' has another scale, layout "
                            f"or shape (A {tuple(a0.a.shape)} vs {tuple(ad.a.shape)}); pass the "
                            "adapters init returned for this training run")
        if getattr(ad, "is_dora", False) or getattr(a0, "is_dora", False):
            raise LoraError(f"to_plain_lora: '{path}' is a DoRA adapter; only plain LoRA factors convert")
        rank_axis = len(ad.stack)
        a = jnp.concatenate([ad.a, a0.a.astype(ad.a.dtype)], axis=-1)
        b = jnp.concatenate([ad.b, -a0.b.astype(ad.b.dtype)], axis=rank_axis)
        out[path] = dataclasses.replace(ad, a=a, b=b)
    return nest(out)
