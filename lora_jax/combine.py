"""Adapter arithmetic: play an adapter at a chosen strength, or combine several into one.

`combine` follows PEFT's `add_weighted_adapter` ("linear", "cat", "svd") in our layout, where
A is [*stack, *inputs, r] and B [*stack, r, *outputs]. Every combined adapter has scale 1.0
(PEFT sets lora_alpha = r), the dropout of the first adapter (PEFT copies the first config),
and is computed in fp32 and cast back to the first adapter's dtypes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import Adapter, adapter_items, is_adapter
from lora_jax.errors import LoraError
from lora_jax.paths import nest

PyTree = Any
_HOWS = ("linear", "cat", "svd")


def with_strength(adapters: PyTree, strength: float) -> PyTree:
    """The same adapters at `strength` (0 = base, 1 = as trained, anything between or beyond).

    Scales the static `scale`, so A and B are untouched and the result stays exact. Because
    `scale` is static metadata, each new strength is a new pytree structure: a jitted function
    taking the adapters retraces and recompiles once per strength value. To sweep strengths
    under one compilation (or make strength a traced/learned value), use `scaled_b`.
    """
    s = float(strength)
    _refuse_dora([adapters], "with_strength")
    return jax.tree_util.tree_map(lambda ad: dataclasses.replace(ad, scale=ad.scale * s),
                                  adapters, is_leaf=is_adapter)


def scaled_b(adapters: PyTree, strength: float | jax.Array) -> PyTree:
    """Like `with_strength`, but multiplies B's values: same structure, so no retrace under jit.

    `strength` may be a traced scalar. In low precision (bf16 B) the product is rounded once.
    """
    _refuse_dora([adapters], "scaled_b")
    return jax.tree_util.tree_map(
        lambda ad: dataclasses.replace(ad, b=(ad.b * strength).astype(ad.b.dtype)),
        adapters, is_leaf=is_adapter)


def _refuse_dora(adapters_list: Sequence[PyTree], what: str) -> None:
    for i, tree in enumerate(adapters_list):
        dora = [p for p, ad in adapter_items(tree) if ad.is_dora]
        if dora:
            raise LoraError(f"{what}: adapter tree {i} is DoRA (at '{dora[0]}'); its magnitude does "
                            "not scale or add like A·B, so only plain LoRA adapters are supported")


def _layout_key(ad: Adapter) -> tuple:
    """Everything two adapters of one weight must share; rank is left out."""
    n = len(ad.stack)
    return (ad.stack, ad.inputs, ad.outputs, tuple(ad.a.shape[:-1]),
            tuple(ad.b.shape[:n]) + tuple(ad.b.shape[n + 1:]))


def _aligned(adapters_list: Sequence[PyTree]) -> dict[str, list[Adapter]]:
    """path -> the adapters of that path, one per tree; refuses trees that do not line up."""
    items = [dict(adapter_items(t)) for t in adapters_list]
    paths = list(items[0])
    if not paths:
        raise LoraError("adapter tree 0 holds no adapters; nothing to combine")
    for i, found in enumerate(items[1:], start=1):
        missing = [p for p in paths if p not in found]
        extra = [p for p in found if p not in items[0]]
        if missing or extra:
            what = f"lacks '{missing[0]}'" if missing else f"has extra '{extra[0]}'"
            raise LoraError(f"adapter tree {i} {what}; combined adapters must target the same weights")
    out = {}
    for p in paths:
        ads = [found[p] for found in items]
        key0 = _layout_key(ads[0])
        for i, ad in enumerate(ads[1:], start=1):
            if _layout_key(ad) != key0:
                raise LoraError(
                    f"adapter tree {i} lays out '{p}' as A {tuple(ad.a.shape)} B {tuple(ad.b.shape)} "
                    f"(stack {ad.stack}, inputs {ad.inputs}, outputs {ad.outputs}); tree 0 has A "
                    f"{tuple(ads[0].a.shape)} B {tuple(ads[0].b.shape)} (stack {ads[0].stack}, "
                    f"inputs {ads[0].inputs}, outputs {ads[0].outputs})")
        out[p] = ads
    return out


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _linear(ads: list[Adapter], weights: list[float]) -> Adapter:
    """PEFT's linear: A = Σ sign(c_i)·√|c_i|·A_i, B = Σ √|c_i|·B_i with c_i = w_i·s_i."""
    c = [w * ad.scale for w, ad in zip(weights, ads)]
    a = sum(math.copysign(math.sqrt(abs(ci)), ci) * _f32(ad.a) for ci, ad in zip(c, ads))
    b = sum(math.sqrt(abs(ci)) * _f32(ad.b) for ci, ad in zip(c, ads))
    return dataclasses.replace(ads[0], a=a.astype(ads[0].a.dtype), b=b.astype(ads[0].b.dtype),
                               scale=1.0)


def _cat(ads: list[Adapter], weights: list[float]) -> Adapter:
    """Ranks side by side, w_i·s_i folded into B_i: exactly Σ w_i·ΔW_i at scale 1."""
    a = jnp.concatenate([_f32(ad.a) for ad in ads], axis=-1)
    b = jnp.concatenate([w * ad.scale * _f32(ad.b) for w, ad in zip(weights, ads)],
                        axis=len(ads[0].stack))
    return dataclasses.replace(ads[0], a=a.astype(ads[0].a.dtype), b=b.astype(ads[0].b.dtype),
                               scale=1.0)


def _svd(ads: list[Adapter], weights: list[float], rank: int) -> Adapter:
    """Top-r SVD of Σ w_i·ΔW_i per stack index, split evenly: A = U·√S, B = √S·Vᵀ."""
    ad0 = ads[0]
    delta = sum(w * ad.delta(jnp.promote_types(ad.a.dtype, jnp.float32))
                for w, ad in zip(weights, ads))
    n = len(ad0.stack)
    stack_shape = tuple(ad0.a.shape[:n])
    in_shape, out_shape = tuple(ad0.a.shape[n:-1]), tuple(ad0.b.shape[n + 1:])
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    m_SxIxO = jnp.transpose(delta, ad0.stack + ad0.inputs + ad0.outputs).reshape(
        stack_shape + (n_in, n_out))
    u_SxIxK, s_SxK, vt_SxKxO = jnp.linalg.svd(m_SxIxO, full_matrices=False)
    r = min(rank, n_in, n_out)
    root_SxR = jnp.sqrt(s_SxK[..., :r])
    a = (u_SxIxK[..., :r] * root_SxR[..., None, :]).reshape(stack_shape + in_shape + (r,))
    b = (root_SxR[..., :, None] * vt_SxKxO[..., :r, :]).reshape(stack_shape + (r,) + out_shape)
    return dataclasses.replace(ad0, a=a.astype(ad0.a.dtype), b=b.astype(ad0.b.dtype), scale=1.0)


def combine(adapters_list: Sequence[PyTree], weights: Sequence[float], how: str = "linear",
            rank: int | None = None) -> PyTree:
    """One adapter tree from several trees over the same weights (PEFT's add_weighted_adapter).

    Per weight, with ΔW_i = s_i·A_i·B_i and c_i = w_i·s_i (result scale 1.0 in every mode):
      linear -- A = Σ sign(c_i)·√|c_i|·A_i, B = Σ √|c_i|·B_i (all ranks equal; rank kept).
                Mixes factors, so ΔW = A·B = Σ c_i·A_i·B_i plus cross terms c_ij·A_i·B_j:
                NOT Σ w_i·ΔW_i in general. Exact for one adapter, or copies of one adapter
                (weights (1, -1) of an adapter with itself give ΔW = 0: the base).
      cat    -- A = [A_1 … A_n] along rank, B = [c_1·B_1; …; c_n·B_n]: exactly Σ w_i·ΔW_i,
                at rank Σ r_i.
      svd    -- the best rank-`rank` approximation of Σ w_i·ΔW_i (per stack index), as
                A = U·√S, B = √S·Vᵀ. `rank` defaults to the largest input rank and is capped per
                weight at min(n_in, n_out); exact once rank ≥ rank(Σ w_i·ΔW_i).
    """
    if how not in _HOWS:
        raise LoraError(f"unknown combination how={how!r}; expected one of {', '.join(_HOWS)}")
    adapters_list = list(adapters_list)
    if not adapters_list:
        raise LoraError("combine got an empty list of adapter trees; expected at least one")
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters_list):
        raise LoraError(f"combine got {len(weights)} weights for {len(adapters_list)} adapter trees;"
                        " expected one weight per tree")
    if rank is not None and (how != "svd" or isinstance(rank, bool) or not isinstance(rank, int)
                             or rank < 1):
        raise LoraError(f"rank={rank!r} is only for how='svd' and must be a positive int")
    _refuse_dora(adapters_list, "combine")
    aligned = _aligned(adapters_list)
    if rank is None:  # PEFT: the largest rank of the inputs
        rank = max(ad.rank for ads in aligned.values() for ad in ads)
    out = {}
    for path, ads in aligned.items():
        if how == "linear":
            ranks = [ad.rank for ad in ads]
            if len(set(ranks)) != 1:
                raise LoraError(f"how='linear' needs equal ranks, but '{path}' has ranks {ranks}; "
                                "use how='cat' or how='svd'")
            out[path] = _linear(ads, weights)
        elif how == "cat":
            out[path] = _cat(ads, weights)
        else:
            out[path] = _svd(ads, weights, rank)
    return nest(out)
