"""DoRA (Liu et al. 2024): W' = m/‖W + ΔW‖ · (W + ΔW), the norm taken over W's input axes.

m [*stack, *outputs] is trained; ΔW = s·A·B is the LoRA branch. As in the paper's §4.3 and PEFT,
the norm is a constant in backprop. `lora_jax.apply` computes the factor g = m/‖W + ΔW‖ once
per weight per call (every layer of a stack at once, never per example) and the consumer rules
multiply their output by it along W's output axes: y = g ⊙ (x·W + s·(x·A)·B). With dropout on
the branch's input x_d, PEFT's form is kept: y = x·W + (g − 1) ⊙ x_d·W + g ⊙ s·(x_d·A)·B.

The norm never forms W + ΔW: ‖W + ΔW‖² = ‖W‖² + 2s·Σ_r (Wᵀ·A)∘B + s²·Σ_rq (AᵀA)_rq B_r B_q,
one pass over W plus rank-sized products. A quantised W is dequantised for it, one layer at a
time when it is a stack.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.quant.frozen import frozen, is_frozen, scan_slices
from lora_jax.quant.weight import is_quantized

R, Q = "Y", "Z"  # einsum labels of the two rank axes


def _labels(stack, inputs, outputs) -> tuple[str, str, str, str]:
    """Einsum labels of W, A, B and of m (stack then outputs) for these axis groups."""
    lab = string.ascii_letters[: len(stack) + len(inputs) + len(outputs)]
    s = "".join(lab[i] for i in stack)
    i = "".join(lab[j] for j in inputs)
    o = "".join(lab[j] for j in outputs)
    return lab, s + i + R, s + R + o, s + o


def _norm(w, a, b, scale: float, stack, inputs, outputs) -> jax.Array:
    """‖W + s·A·B‖ from ‖W‖², the cross term and the rank-space Gram, in fp32 at full precision
    (no TF32/bf16 passes: the norm scales every output)."""
    f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    w, a, b = f32(w), f32(a), f32(b)
    w_lab, a_lab, b_lab, m_lab = _labels(stack, inputs, outputs)
    s_lab = m_lab[: len(stack)]
    ein = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    sq_SxO = ein(f"{w_lab},{w_lab}->{m_lab}", w, w)
    wa_SxRxO = ein(f"{w_lab},{a_lab}->{b_lab}", w, a)  # Wᵀ·A
    cross_SxO = ein(f"{b_lab},{b_lab}->{m_lab}", wa_SxRxO, b)
    gram_SxRxQ = ein(f"{a_lab},{a_lab.replace(R, Q)}->{s_lab}{R}{Q}", a, a)  # AᵀA
    gb_SxRxO = ein(f"{s_lab}{R}{Q},{b_lab.replace(R, Q)}->{b_lab}", gram_SxRxQ, b)
    last_SxO = ein(f"{b_lab},{b_lab}->{m_lab}", gb_SxRxO, b)  # ‖A·B‖² per output
    return jnp.sqrt(jnp.maximum(sq_SxO + 2.0 * scale * cross_SxO + scale**2 * last_SxO, 0.0))


def column_norm(w: Any, ad: Any) -> jax.Array:
    """‖W + s·A·B‖ over W's input axes, [*stack, *outputs] in fp32. `w` is an array or a
    quantised `Frozen`; a quantised stack is dequantised one layer at a time."""
    if is_frozen(w) and w.q.stack_axes and ad.stack and ad.stack[0] == 0:
        q, step = scan_slices(w)
        less = lambda axes: tuple(i - 1 for i in axes if i != 0)
        inner = (less(ad.stack), less(ad.inputs), less(ad.outputs))
        return jax.lax.map(lambda xs: column_norm_of(step(xs[0]), xs[1], xs[2], ad.scale, *inner),
                           (q, ad.a, ad.b))
    return column_norm_of(w, ad.a, ad.b, ad.scale, ad.stack, ad.inputs, ad.outputs)


def column_norm_of(w, a, b, scale, stack, inputs, outputs) -> jax.Array:
    w = w.dense() if is_frozen(w) else w
    return _norm(w, a, b, scale, stack, inputs, outputs)


def factor(w: Any, ad: Any) -> jax.Array:
    """g = m/‖W + ΔW‖ [*stack, *outputs], the norm held constant for the gradient."""
    n = jax.lax.stop_gradient(column_norm(w, ad))
    return ad.m.astype(jnp.promote_types(ad.m.dtype, jnp.float32)) / n


@jax.jit
def factors(weights: dict[str, Any], adapters: dict[str, Any]) -> dict[str, jax.Array]:
    """{path: g} for the DoRA weights among `weights` (arrays or `Frozen`s): one compiled call."""
    return {p: factor(w, adapters[p]) for p, w in weights.items()}


@functools.partial(jax.jit, static_argnames="dtype")
def with_magnitudes(weights: dict[str, Any], adapters: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """`adapters` with DoRA's initial m = ‖W‖ over each weight's input axes: the adapted weight at
    init is W itself (B = 0; or PiSSA/OLoRA's factors on their residual base), so g = 1.
    `weights` holds arrays or QuantizedWeights, by path."""
    out = {}
    for p, ad in adapters.items():
        w = frozen(weights[p], p) if is_quantized(weights[p]) else weights[p]
        m = column_norm(w, dataclasses.replace(ad, b=jnp.zeros_like(ad.b)))
        out[p] = dataclasses.replace(ad, m=m.astype(dtype))
    return out


def along(g: jax.Array, positions: Sequence[int], ndim: int) -> jax.Array:
    """`g` reshaped to broadcast against an `ndim`-d array whose axis positions[k] is g's axis k."""
    order = sorted(range(len(positions)), key=lambda k: positions[k])
    shape = [1] * ndim
    for k in order:
        shape[positions[k]] = g.shape[k]
    return jnp.transpose(g, order).reshape(shape)


def positions(path: str, labels: Sequence[str], target: Sequence[str]) -> list[int]:
    """Where each of g's axes (by einsum label) sits among an operand's or a result's labels."""
    if any(lab not in target for lab in labels):
        raise LoraError(f"DoRA adapter for '{path}': this use of W does not keep all of W's stack "
                        "and output axes, so the magnitude cannot be applied; use plain LoRA here")
    return [list(target).index(lab) for lab in labels]


def rescale(g: jax.Array, positions: Sequence[int], base: jax.Array, delta: jax.Array,
            base_dropped: jax.Array | None = None) -> jax.Array:
    """A consumer's DoRA output from its base op and LoRA branch; `base_dropped` is the base op
    on the dropped-out input when dropout is active (PEFT's training form)."""
    g = along(g, positions, base.ndim).astype(base.dtype)
    delta = delta.astype(base.dtype)
    if base_dropped is None:
        return (base + delta) * g
    return base + (g - 1) * base_dropped.astype(base.dtype) + g * delta


def merged_weight(w: jax.Array, ad: Any) -> tuple[jax.Array, jax.Array]:
    """(m/n · (W + ΔW), n) in fp32, with n = ‖W + ΔW‖ the norm `unmerged_weight` needs back."""
    full = w.astype(jnp.promote_types(w.dtype, jnp.float32)) + ad.delta(jnp.float32)
    n = jnp.sqrt(jnp.sum(jnp.square(full), axis=ad.inputs))  # axes left: stack, outputs in W's order
    n = jnp.transpose(n, _m_order(ad))
    return full * along(ad.m / n, (*ad.stack, *ad.outputs), w.ndim), n


def unmerged_weight(merged: jax.Array, ad: Any, n: jax.Array) -> jax.Array:
    """W from a merged weight and the norm `merged_weight` returned (exact to fp32 rounding)."""
    full = merged.astype(jnp.promote_types(merged.dtype, jnp.float32))
    return full / along(ad.m / n, (*ad.stack, *ad.outputs), merged.ndim) - ad.delta(jnp.float32)


def _m_order(ad: Any) -> list[int]:
    """The transpose taking W's axes left after summing the inputs to m's order (stack, outputs)."""
    left = [i for i in range(ad.w_ndim) if i not in ad.inputs]
    return [left.index(i) for i in (*ad.stack, *ad.outputs)]


def m_shape(ad: Any, w_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(w_shape[i] for i in (*ad.stack, *ad.outputs))
