"""Reading safetensors checkpoints straight into (possibly sharded) JAX arrays.

Each params leaf is built with jax.make_array_from_callback, and the callback reads only the
slice a device needs through safe_open(...).get_slice, so a large model is never materialised
whole on one device or in host memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from lora_jax.errors import LoraError
from lora_jax.models.hf_names import flax_to_hf, is_stacked

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class SafetensorsDir:
    """The tensors of an HF model directory (one file or an index of shards), opened lazily."""

    def __init__(self, directory: Path, prefix: str = ""):
        self.directory = directory
        self.prefix = prefix
        self.used: set[str] = set()
        self._files: dict[str, Any] = {}
        if (directory / _INDEX).is_file():
            weight_map = json.loads((directory / _INDEX).read_text())["weight_map"]
            self.key_file = dict(weight_map)
        elif (directory / _SINGLE).is_file():
            with safe_open(str(directory / _SINGLE), "np") as f:
                self.key_file = {k: _SINGLE for k in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
                p.name for p in directory.glob("*.pt*")
            )
            if pickles:
                raise LoraError(
                    f"{directory} holds only {', '.join(pickles)}: pickle files are not loaded; "
                    "convert the checkpoint to safetensors"
                )
            raise LoraError(f"{directory} has no {_SINGLE} or {_INDEX}")

    def _slice(self, key: str) -> Any:
        name = self.key_file[key]
        if name not in self._files:
            self._files[name] = safe_open(str(self.directory / name), "np")
        return self._files[name].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def read_raw(self, key: str) -> np.ndarray:
        """One whole tensor as stored (a quantised weight's parts; small or packed)."""
        view = self._slice(key)
        return np.asarray(view[:] if view.get_shape() else view[()])

    def _check(self, key: str, want: tuple[int, ...], path: str) -> None:
        if key not in self.key_file:
            raise LoraError(
                f"checkpoint {self.directory} has no tensor '{key}' (needed for '{path}')"
            )
        got = self.shape(key)
        if got != want:
            raise LoraError(
                f"tensor '{key}' in {self.directory} has shape {got}; "
                f"config.json implies {want}"
            )

    def read(self, path: str, shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
        """The params leaf at `path` ([L, ...] for a scanned stack), placed with `sharding`.

        `dtype` (or None: keep the stored one) applies to floating tensors only.
        """
        stacked = is_stacked(path)
        layer_shape = shape[1:] if stacked else shape
        names = [flax_to_hf(path, i) for i in range(shape[0])] if stacked else [flax_to_hf(path)]
        keys = [self.prefix + key for key, _ in names]
        transposed = names[0][1]
        want = tuple(reversed(layer_shape)) if transposed else layer_shape
        for key in keys:
            self._check(key, want, path)
        self.used.update(keys)

        def one(key: str, index: tuple[slice, ...]) -> np.ndarray:
            view = self._slice(key)
            if transposed:
                return np.asarray(view[tuple(reversed(index))]).T
            return np.asarray(view[index]) if index else np.asarray(view[:])

        return array_from_blocks(shape, dtype, sharding, len(keys) if stacked else None,
                                 lambda i, index: one(keys[i or 0], index))

    def check_all_used(self, ignorable: Callable[[str], bool]) -> None:
        """Refuse tensors the model would silently drop (a config that disagrees with weights)."""
        unused = sorted(k for k in self.key_file if k not in self.used and not ignorable(k))
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise LoraError(
                f"checkpoint {self.directory} has tensors config.json gives no place to: "
                f"{', '.join(repr(k) for k in unused[:3])}{more}"
            )


def array_from_blocks(shape: tuple[int, ...], dtype: Any, sharding: Any, layers: int | None,
                      block: Callable[[int | None, tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """An array placed shard by shard, each shard read as it is needed: `block(layer, index)` is
    one layer's part at `index` (layer None when the array is not a stack of `layers` layers).
    `dtype` (or None: keep the stored one) applies to floating tensors only."""

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if layers is not None:
            out = np.stack([block(i, tuple(index[1:])) for i in range(layers)[index[0]]])
        else:
            out = block(None, tuple(index))
        if dtype is not None and jnp.issubdtype(out.dtype, jnp.floating):
            out = out.astype(dtype)
        return np.ascontiguousarray(out)

    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(shape, sharding, callback)
