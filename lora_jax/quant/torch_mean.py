"""The mean of a float32 vector, summed in exactly the order PyTorch's CPU kernel sums it.

Double quantisation subtracts mean(absmax) before quantising; a mean that differs from
bitsandbytes' in its last bit shifts every nested code, so the order of the additions matters.
torch's `sum` (aten/native/cpu/SumKernel.cpp, `cascade_sum`) on one thread: sums vectors of
`lanes` floats in 4 interleaved accumulators, each a 4-level cascade of sequential chunk sums
(16 a chunk up to 2**21 vectors), then adds a scalar tail and the lanes in order; `mean` divides
by n.
`lanes` is 8 on AVX2, NEON and plain CPUs and 16 on AVX-512 ones. Above 32768 items torch
splits the sum over threads; this matches torch with one thread there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUM_LANES = 8
_ILP = 4
_LEVELS = 4


def _fold(xs: jax.Array, zero: jax.Array) -> jax.Array:
    """((0 + xs[0]) + xs[1]) + ...: a left-to-right sum along axis 0 (unrolled when short, as it
    compiles faster)."""
    if xs.shape[0] > 64:
        return jax.lax.scan(lambda acc, x: (acc + x, None), zero, xs)[0]
    for x in xs:
        zero = zero + x
    return zero


def _ceil_log2(n: int) -> int:
    return 1 if n <= 2 else (n - 1).bit_length()


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """SumKernel's multi_row_sum: per column, a 4-level cascade of sequential chunk sums."""
    size, zero = rows.shape[0], jnp.zeros(rows.shape[1:], rows.dtype)
    step = 1 << max(4, _ceil_log2(size) // _LEVELS)
    levels = [rows]  # levels[j]: the sums that flow into accumulator j
    for _ in range(_LEVELS - 1):
        items = levels[-1]
        whole = items.shape[0] // step
        chunks = items[: whole * step].reshape(whole, step, *items.shape[1:])
        levels.append(_fold(jnp.moveaxis(chunks, 1, 0), jnp.zeros(chunks.shape[:1] + zero.shape)))
    # What is left in each accumulator at the end: the unfinished chunk of each level, and in
    # the top one everything that reached it.
    leftovers = [_fold(items[(items.shape[0] // step) * step :], zero) for items in levels[:-1]]
    total = leftovers[0]
    for acc in leftovers[1:]:
        total = total + acc
    return total + _fold(levels[-1], zero)


def _row_sum(items: jax.Array) -> jax.Array:
    """SumKernel's row_sum: 4 interleaved cascades, the remainder, then the 4 partials."""
    size = items.shape[0]
    whole = size // _ILP
    rows = items[: whole * _ILP].reshape(whole, _ILP, *items.shape[1:])
    partials = _multi_row_sum(rows)
    first = partials[0]
    for k in range(whole * _ILP, size):
        first = first + items[k]
    for k in range(1, _ILP):
        first = first + partials[k]
    return first


def torch_cpu_sum(x: jax.Array, lanes: int = SUM_LANES) -> jax.Array:
    """torch.sum(x) of a 1-D float32 x on CPU, bit for bit (one thread)."""
    n = x.shape[0]
    if n < lanes:
        return _row_sum(x)
    whole = n // lanes
    lane_sums = _row_sum(x[: whole * lanes].reshape(whole, lanes))
    total = jnp.zeros((), x.dtype)
    for k in range(whole * lanes, n):
        total = total + x[k]
    for k in range(lanes):
        total = total + lane_sums[k]
    return total


def torch_cpu_mean(x: jax.Array, lanes: int = SUM_LANES) -> jax.Array:
    """torch_cpu_sum / n, a true division (XLA would multiply by a constant 1/n without the
    barrier)."""
    return torch_cpu_sum(x, lanes) / jax.lax.optimization_barrier(jnp.float32(x.shape[0]))
