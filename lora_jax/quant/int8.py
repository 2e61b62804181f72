"""LLM.int8's row-wise weight quantisation (bitsandbytes `int8_vectorwise_quant`, threshold 0:
no outlier split), in jnp.

Each row of a [rows, cols] weight gets scale SCB = max|row| (float32) and codes
round(w * (127 * (1/SCB))) in int8, half to even; bitsandbytes forms 127/SCB as the reciprocal
times 127, two float32 roundings, and so does this. Dequantisation is (q * SCB) * (1/127) with
bitsandbytes' float32 constant for 1/127. An all-zero row gets codes 0 and SCB 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_INV_127 = np.float32(7.874015718698502e-3)


def quantize_rows(w_rc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float [rows, cols] -> (int8 codes [rows, cols], SCB float32 [rows])."""
    w_rc = w_rc.astype(jnp.float32)
    scb_r = jnp.max(jnp.abs(w_rc), axis=1)
    zero_r = scb_r == 0
    scale_r = (1 / jnp.where(zero_r, jnp.float32(1), scb_r)) * 127
    q_rc = jnp.round(w_rc * scale_r[:, None])
    return jnp.where(zero_r[:, None], 0, q_rc).astype(jnp.int8), scb_r


def dequantize_rows(q_rc: jax.Array, scb_r: jax.Array) -> jax.Array:
    """int8 [rows, cols] + SCB [rows] -> float32 [rows, cols]."""
    return q_rc.astype(jnp.float32) * scb_r[:, None] * _INV_127
