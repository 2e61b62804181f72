"""Low-precision matmuls with float32 outputs whose gradients stay low-precision matmuls.

`lax.dot_general(x_bf16, w_bf16, preferred_element_type=float32)` accumulates in float32, as a
loss or a softmax wants, but its cotangent is then float32 too, and JAX's transpose rule dots
that float32 cotangent with the bf16 operand: the backward runs float32 matmuls of activation
size (on a GPU, off the bf16 tensor cores). `dot_f32_out` has the same forward; its backward
casts the cotangent to the operands' dtype first, so both gradient matmuls are bf16 x bf16.
For float32 operands it is exactly `lax.dot_general`'s gradient.

Inside `lora_jax.apply`, a custom derivative around an adapted weight is inlined (see the
interpreter), so an adapted weight gets the plain rule; frozen weights keep this one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_f32_out(x: jax.Array, y: jax.Array, dimension_numbers) -> jax.Array:
    """lax.dot_general(x, y, dimension_numbers) accumulated and returned in float32."""
    return jax.lax.dot_general(x, y, dimension_numbers, preferred_element_type=jnp.float32)


def _forward(x, y, dimension_numbers):
    return dot_f32_out(x, y, dimension_numbers), (x, y)


def _backward(dimension_numbers, residuals, g):
    x, y = residuals
    dtype = jnp.result_type(x.dtype, y.dtype)
    _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers),
                     x.astype(dtype), y.astype(dtype))
    dx, dy = vjp(g.astype(dtype))
    return dx.astype(x.dtype), dy.astype(y.dtype)


dot_f32_out.defvjp(_forward, _backward)


def grouped_attention(q_BxTxHxK: jax.Array, k_BxSxVxK: jax.Array, v_BxSxVxK: jax.Array,
                      allowed_BxTxS: jax.Array, scale: float | None = None,
                      softcap: float | None = None) -> jax.Array:
    """Softmax attention with grouped KV heads (H/V queries per KV head, K/V never repeated),
    as XLA runs it: logits and softmax in float32, the value matmul in the activations' dtype.
    The same math as `jax.nn.dot_product_attention`'s XLA path, but via `dot_f32_out`, so the
    backward's matmuls are bf16 too. A row with nothing allowed attends uniformly (as there).
    `scale` defaults to 1/sqrt(K); `softcap` caps the scaled logits at ±cap by cap·tanh(x/cap)."""
    B, T, H, K = q_BxTxHxK.shape
    V = k_BxSxVxK.shape[2]
    q_BxTxVxGxK = q_BxTxHxK.reshape(B, T, V, H // V, K)
    logits_BxVxTxGxS = dot_f32_out(q_BxTxVxGxK, k_BxSxVxK, (((4,), (3,)), ((0, 2), (0, 2))))
    logits_BxVxTxGxS = logits_BxVxTxGxS * jnp.float32(K ** -0.5 if scale is None else scale)
    if softcap is not None:
        logits_BxVxTxGxS = jnp.tanh(logits_BxVxTxGxS / jnp.float32(softcap)) * jnp.float32(softcap)
    mask_Bx1xTx1xS = allowed_BxTxS[:, None, :, None, :]
    fill = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)
    probs_BxVxTxGxS = jax.nn.softmax(jnp.where(mask_Bx1xTx1xS, logits_BxVxTxGxS, fill), axis=-1)
    out_BxTxVxGxK = jnp.einsum("bvtgs,bsvk->btvgk", probs_BxVxTxGxS.astype(v_BxSxVxK.dtype), v_BxSxVxK)
    return out_BxTxVxGxK.reshape(B, T, H, K)
