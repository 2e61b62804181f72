"""Checksums of saved arrays, so a checkpoint or adapter damaged on disk is never used silently.

A leaf's bits are read as unsigned 32-bit words; each word is multiplied by an odd weight that
depends on its position and the products are summed with wraparound (mod 2**32). An odd weight
is invertible mod 2**32, so changing any single word always changes the sum, and moving words
around changes it too (the weights differ). Integer addition is exact and associative, so the
sum is the same under every sharding, device count and process count: each device reduces its
own shard and only one scalar per leaf leaves the devices (full fine-tuning weights are never
gathered to a host).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.paths import flat_paths

PyTree = Any
ALGORITHM = "odd-weighted-sum32"


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words (narrower types widened, 64-bit ones split in two)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> a trailing axis of 2 words


def _odd_weights(shape: tuple[int, ...]) -> jax.Array:
    """A hashed, always odd, weight per flat position (computed per shard, never gathered)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    h = index * jnp.uint32(0x9E3779B9)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    return h | jnp.uint32(1)


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    words = _words(x)
    total = jnp.sum(words * _odd_weights(words.shape), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return total, finite


@jax.jit
def _digests(leaves: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    sums, finite = zip(*(_leaf_digest(x) for x in leaves)) if leaves else ((), ())
    return list(sums), jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


def _scalar(x: Any) -> np.ndarray:
    """A replicated scalar's value, read from this process's first shard (no collective)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def checksums(tree: PyTree) -> tuple[dict[str, int], bool]:
    """({leaf path: checksum}, whether every float in `tree` is finite), computed on device.

    Every process of a multi-process run must call this together (it is one jitted program).
    """
    items = flat_paths(tree)
    sums, finite = _digests([x for _, x in items])
    return {path: int(_scalar(s)) for (path, _), s in zip(items, sums)}, bool(_scalar(finite))


def mismatches(saved: dict[str, int], tree: PyTree) -> list[str]:
    """Paths of `tree`'s leaves whose checksum differs from (or is missing in) `saved`."""
    now, _ = checksums(tree)
    return [p for p in sorted(set(saved) | set(now)) if saved.get(p) != now.get(p)]
