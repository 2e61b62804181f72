"""MoE expert weights <-> the tensors of an HF checkpoint.

transformers 5 holds a layer's experts as two 3-D parameters (experts.gate_up_proj [E, 2F, D],
experts.down_proj [E, D, F]) but `save_pretrained` writes, as the hub checkpoints are, one
2-D tensor per expert and projection: Qwen3-MoE `mlp.experts.{e}.gate_proj|up_proj|down_proj`,
Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2` (gate, up, down) and its router under
`block_sparse_moe.gate`. Both layouts are read; ours is [E, in, out] per projection, gate and up
side by side on the last axis of gate_up_proj.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.models.checkpoint import array_from_blocks
from lora_jax.models.hf_names import flax_to_hf, is_stacked

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_EXPERT_PATH = re.compile(r".*/experts/(gate_up_proj|down_proj)$")
_PER_EXPERT = {"qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
               "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})}


def is_expert_path(path: str) -> bool:
    return _EXPERT_PATH.fullmatch(path) is not None


def expert_module(path: str, layer: int | None = None) -> tuple[str, str]:
    """(HF module name, parameter name) of an expert weight, as transformers 5 names it in
    memory (what PEFT's target_parameters refer to): ("model.layers.3.mlp.experts", "down_proj")."""
    *mods, param = path.split("/")
    key, _ = flax_to_hf("/".join([*mods, "kernel"]), layer)
    return key.rsplit(".", 1)[0], param


def _layer_arrays(tensors: Any, model_type: str, module: str, param: str) -> np.ndarray:
    """One layer's expert weight in our layout [E, in, out], from either checkpoint layout."""
    fused = f"{tensors.prefix}{module}.{param}"
    if fused in tensors.key_file:
        tensors.used.add(fused)
        return np.swapaxes(tensors.read_raw(fused), -1, -2)
    block, names = _PER_EXPERT[model_type]
    base = module.replace(".mlp.experts", f".{block}.experts")
    parts = ("gate", "up") if param == "gate_up_proj" else ("down",)
    experts = []
    e = 0
    while f"{tensors.prefix}{base}.{e}.{names[parts[0]]}.weight" in tensors.key_file:
        keys = [f"{tensors.prefix}{base}.{e}.{names[p]}.weight" for p in parts]
        tensors.used.update(keys)
        experts.append(np.concatenate([tensors.read_raw(k).T for k in keys], axis=-1))
        e += 1
    if not experts:
        raise LoraError(f"checkpoint {tensors.directory} has neither '{fused}' nor per-expert "
                        f"tensors '{base}.0.{names[parts[0]]}.weight'")
    return np.stack(experts)


def read_expert(tensors: Any, model_type: str, path: str, shape: tuple[int, ...], dtype: Any,
                sharding: Any) -> jax.Array:
    """The params leaf of an expert weight ([L, E, in, out] for a scanned stack), placed."""
    stacked = is_stacked(path)
    layers = range(shape[0]) if stacked else [None]
    cache: dict[Any, np.ndarray] = {}

    def layer(i):
        if i not in cache:
            module, param = expert_module(path, i)
            cache[i] = _layer_arrays(tensors, model_type, module, param)
            want = shape[1:] if stacked else shape
            if cache[i].shape != tuple(want):
                raise LoraError(f"expert weight '{module}.{param}' in {tensors.directory} has shape "
                                f"{cache[i].shape} in [experts, in, out]; config.json implies {tuple(want)}")
        return cache[i]

    for i in layers:  # read (and check) every layer now, so a bad checkpoint fails here
        layer(i)

    return array_from_blocks(shape, dtype, sharding, shape[0] if stacked else None,
                             lambda i, index: layer(i)[index])


def expert_tensors(path: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """An expert weight as transformers 5 names and lays it out in memory ([E, out, in] under
    `...mlp.experts.<param>`), which its from_pretrained reads as it is, for any MoE family."""
    layers = [(i, array[i]) for i in range(array.shape[0])] if is_stacked(path) else [(None, array)]
    out = {}
    for layer, piece in layers:
        module, param = expert_module(path, layer)
        out[f"{module}.{param}"] = np.ascontiguousarray(np.swapaxes(piece, -1, -2))
    return out


def router_key(tensors: Any, model_type: str, path: str, layer: int | None) -> str | None:
    """Mixtral's legacy checkpoints keep the router under block_sparse_moe: its key there."""
    key, _ = flax_to_hf(path, layer)
    if model_type != "mixtral" or not key.endswith(".mlp.gate.weight") \
            or tensors.prefix + key in tensors.key_file:
        return None
    return key.replace(".mlp.gate.", ".block_sparse_moe.gate.")


def read_param(reader: Any, model_type: str, path: str, shape: tuple[int, ...], dtype: Any,
               sharding: Any) -> Any:
    """One params leaf of a MoE decoder: experts and a Mixtral router here, the rest by `reader`."""
    tensors = reader.tensors
    if is_expert_path(path):
        return read_expert(tensors, model_type, path, shape, dtype, sharding)
    first = 0 if is_stacked(path) else None
    if path.endswith("/mlp/gate/kernel") and router_key(tensors, model_type, path, first):
        layers = range(shape[0]) if is_stacked(path) else [None]
        arrays = []
        for i in layers:
            key = tensors.prefix + router_key(tensors, model_type, path, i)
            tensors.used.add(key)
            arrays.append(tensors.read_raw(key).T)
        value = np.stack(arrays) if is_stacked(path) else arrays[0]
        if dtype is not None:
            value = value.astype(dtype)
        return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
    return reader.read(path, shape, dtype, sharding)
