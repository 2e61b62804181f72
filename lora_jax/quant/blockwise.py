"""bitsandbytes' blockwise absmax quantisation, in jnp, on flat float32 vectors.

`quantize_4bit`/`dequantize_4bit` follow the "default" kernels bitsandbytes runs on CPU (and the
CUDA kernels' semantics); `quantize_8bit`/`dequantize_8bit` follow its native CPU kernel for the
dynamic 8-bit map, which double quantisation uses for the absmax of the 4-bit blocks. The order
of the float operations is bitsandbytes' own, so every bit agrees:
- a whole block is scaled by the float32 reciprocal of its absmax (x * (1/absmax)); a partial
  last block of the 4-bit path is divided by its absmax instead, and its stored absmax is raised
  to 1e-38 (a float32 subnormal) when the block is all zero;
- scaled values are clipped to [-1, 1] and take the nearest code, ties to the lower one;
- dequantisation is code * absmax in float32, cast to the output dtype only at the end.
Two XLA rewrites would break this and are blocked (see `_rounded` and the partial block): a
division by a broadcast scalar becomes a multiply by its reciprocal, and a product followed by
an add becomes one fma. XLA on CPU flushes subnormals to zero, so blocks whose values or absmax
are below 1.2e-38 are not bit exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant import codes

NESTED_BLOCKSIZE = 256
_ZERO_PARTIAL_ABSMAX = np.float32(1e-38)


def _blocks(x_n: jax.Array, blocksize: int) -> jax.Array:
    """[n] -> [blocks, blocksize], the last block padded with zeros."""
    n = x_n.shape[0]
    blocks = -(-n // blocksize)
    return jnp.pad(x_n, (0, blocks * blocksize - n)).reshape(blocks, blocksize)


def _safe(absmax_b: jax.Array) -> jax.Array:
    """absmax with 0 -> 1: an all-zero block scales to zeros either way, without 0 * inf."""
    return jnp.where(absmax_b == 0, jnp.float32(1), absmax_b)


def quantize_4bit(x_n: jax.Array, kind: str, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """float32 [n] -> (packed uint8 [(n+1)//2], absmax float32 [ceil(n/blocksize)])."""
    n = x_n.shape[0]
    x_bk = _blocks(x_n, blocksize)
    absmax_b = jnp.max(jnp.abs(x_bk), axis=1)
    scaled_bk = x_bk * (1 / _safe(absmax_b))[:, None]
    if n % blocksize:
        last = absmax_b[-1]
        # A true division: XLA would turn x / broadcast(a) into x * (1/a) without the barrier.
        divisor = jax.lax.optimization_barrier(jnp.broadcast_to(_safe(last), x_bk[-1].shape))
        scaled_bk = scaled_bk.at[-1].set(x_bk[-1] / divisor)
        absmax_b = absmax_b.at[-1].set(jnp.where(last == 0, _ZERO_PARTIAL_ABSMAX, last))
    scaled = jnp.clip(scaled_bk, -1, 1).reshape(-1)[: n + n % 2]  # the pad element scales to +0
    midpoints, order = codes.bounds_4bit(kind)
    rank = jnp.searchsorted(jnp.asarray(midpoints), scaled, side="left", method="compare_all")
    q = jnp.asarray(order)[rank] if kind != "nf4" else rank.astype(jnp.uint8)
    packed = (q[0::2] << 4) | q[1::2]  # the even element in the high nibble
    return packed.astype(jnp.uint8), absmax_b


def dequantize_4bit(packed: jax.Array, absmax_b: jax.Array, kind: str, blocksize: int, n: int) -> jax.Array:
    """packed uint8 [(n+1)//2] + absmax float32 [blocks] -> float32 [n]."""
    q = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]
    values = jnp.asarray(codes.TABLES_4BIT[kind])[q]
    return (_blocks(values, blocksize) * absmax_b[:, None]).reshape(-1)[:n]


def quantize_8bit(x_n: jax.Array, blocksize: int = NESTED_BLOCKSIZE) -> tuple[jax.Array, jax.Array]:
    """float32 [n] -> (codes uint8 [n] into codes.dynamic_map(), absmax float32 [blocks]), as
    bitsandbytes' CPU kernel: x * (1/absmax), clipped, rounded to the 65536-point grid
    (v + 1) * 0.5 * 65535 + 0.5 (truncated), whose code is read from codes.dynamic_lut();
    an all-zero block gets code 0 and absmax 0."""
    n = x_n.shape[0]
    x_bk = _blocks(x_n, blocksize)
    absmax_b = jnp.max(jnp.abs(x_bk), axis=1)
    scaled_bk = jnp.clip(x_bk * (1 / _safe(absmax_b))[:, None], -1, 1)
    grid_bk = ((scaled_bk + 1) * 0.5 * (codes.LUT_SIZE - 1) + 0.5).astype(jnp.int32)
    q_bk = jnp.asarray(codes.dynamic_lut())[grid_bk]
    q_bk = jnp.where((absmax_b == 0)[:, None], jnp.uint8(0), q_bk)
    return q_bk.reshape(-1)[:n], absmax_b


def dequantize_8bit(q_n: jax.Array, absmax_b: jax.Array, blocksize: int = NESTED_BLOCKSIZE) -> jax.Array:
    values = jnp.asarray(codes.dynamic_map())[q_n]
    return (_blocks(values, blocksize) * absmax_b[:, None]).reshape(-1)[: q_n.shape[0]]


def dequantize_nested_absmax(qabsmax: jax.Array, nested_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """code8[q] * nested_absmax + offset in two float32 roundings, as bitsandbytes."""
    return _rounded(dequantize_8bit(qabsmax, nested_absmax)) + offset


def _rounded(x: jax.Array) -> jax.Array:
    """x itself (NaN stays NaN), in a form XLA cannot see through: without it XLA fuses a product
    and the add after it into one fma, whose single rounding differs from bitsandbytes' two.
    (optimization_barrier, bitcasts and reduce_precision do not stop it.)"""
    return jnp.where(x == x, x, jnp.nan)
