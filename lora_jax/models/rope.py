"""Rotary position embeddings, including Llama 3 frequency scaling.

Frequencies are computed in float32 numpy at trace time (they depend only on the config), so the
traced forward holds them as constants and LoRA's jaxpr rewrite never sees them.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError


def _llama3_scale(inv_freq_F: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.x: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen_F = 2 * math.pi / inv_freq_F
    long_F = wavelen_F > old_ctx / low  # low frequencies: scaled fully
    short_F = wavelen_F < old_ctx / high  # high frequencies: untouched
    smooth_F = (old_ctx / wavelen_F - low) / (high - low)
    blended_F = (1 - smooth_F) * inv_freq_F / factor + smooth_F * inv_freq_F
    out_F = np.where(long_F, inv_freq_F / factor, blended_F)
    out_F = np.where(short_F, inv_freq_F, out_F)
    return out_F.astype(np.float32)


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """[head_dim/2] float32 inverse frequencies for the given rope config."""
    exps_F = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq_F = (1.0 / (np.float32(theta) ** exps_F)).astype(np.float32)
    if not scaling:
        return inv_freq_F
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq_F
    if kind == "llama3":
        return _llama3_scale(inv_freq_F, scaling)
    if kind == "linear":
        return (inv_freq_F / np.float32(scaling["factor"])).astype(np.float32)
    raise LoraError(f"rope_scaling type '{kind}' is not supported (default, linear, llama3 are)")


def rope_tables(
    positions_BxT: jnp.ndarray, inv_freq_F: np.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables [B,T,head_dim] in the half-split layout HF checkpoints use."""
    pos_BxTx1 = positions_BxT.astype(jnp.float32)[:, :, None]
    angles_BxTxF = pos_BxTx1 * jnp.asarray(inv_freq_F)[None, None, :]
    angles_BxTxD = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)
    return jnp.cos(angles_BxTxD), jnp.sin(angles_BxTxD)


def apply_rope(
    x_BxTxHxD: jnp.ndarray, cos_BxTxD: jnp.ndarray, sin_BxTxD: jnp.ndarray
) -> jnp.ndarray:
    """Rotate pairs (i, i + D/2) of each head vector by the position's angle."""
    half = x_BxTxHxD.shape[-1] // 2
    x1, x2 = x_BxTxHxD[..., :half], x_BxTxHxD[..., half:]
    rotated_BxTxHxD = jnp.concatenate([-x2, x1], axis=-1)
    cos_BxTx1xD = cos_BxTxD[:, :, None, :].astype(x_BxTxHxD.dtype)
    sin_BxTx1xD = sin_BxTxD[:, :, None, :].astype(x_BxTxHxD.dtype)
    return x_BxTxHxD * cos_BxTx1xD + rotated_BxTxHxD * sin_BxTx1xD
