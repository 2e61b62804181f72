"""Frozen weights quantised at load time, or read as bitsandbytes stored them.

load(path, quant="nf4") quantises each linear layer's kernel as it is read: one tensor is dense
at a time, on one device, and only its QuantizedWeight is kept. A checkpoint transformers saved
quantised (`*-bnb-4bit`, LLM.int8) is read as stored, never dequantised. Which weights:
those bitsandbytes/transformers quantise, every linear layer's kernel except the LM head;
embeddings, norms and biases stay dense.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.models.checkpoint import SafetensorsDir
from lora_jax.models.hf_names import flax_to_hf, is_stacked, unstack_path
from lora_jax.paths import flat_paths, nest
from lora_jax.quant import KINDS, QuantizedWeight, quantize
from lora_jax.quant.bnb_layout import layout_index, read_bnb, stored_kind

# quantize, compiled once per kernel shape (and jitted as in the parity tests)
quantize_jit = jax.jit(quantize, static_argnames=("kind", "blocksize", "double_quant", "transpose",
                                                 "stack_axes"))


def quantizable(path: str) -> bool:
    """Whether a params path is a kernel bitsandbytes would quantise (not the LM head)."""
    parts = path.split("/")
    return parts[-1] == "kernel" and "lm_head" not in parts


def check_quant(quant: Any, hf_config: dict[str, Any]) -> None:
    if quant is not None and quant not in KINDS:
        raise LoraError(f"quant={quant!r}; expected None or one of {', '.join(KINDS)}")
    method = (hf_config.get("quantization_config") or {}).get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise LoraError(f"config.json's quantization_config.quant_method is {method!r}; only "
                        "bitsandbytes-quantised checkpoints (or dense ones) can be read")


def quantize_kernels(params: Any, quant: str) -> Any:
    """The params tree with every `quantizable` kernel quantised (stacks layer by layer)."""
    flat = {}
    for path, x in flat_paths(params):
        if quantizable(path):
            x = quantize_jit(x, kind=quant, transpose=True, stack_axes=1 if is_stacked(path) else 0)
        flat[path] = x
    return nest(flat)


class QuantizingReader:
    """Reads params leaves from `tensors`, quantising or decoding the linear kernels."""

    def __init__(self, tensors: SafetensorsDir, quant: str | None, int8_dtype: str):
        self.tensors, self.quant, self.int8_dtype = tensors, quant, int8_dtype
        self.layouts = layout_index(tensors.key_file)

    def read(self, path: str, shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
        """The leaf at `path`: a jax.Array, or a QuantizedWeight of the Flax kernel. A scanned
        stack [L, ...] is read, quantised or decoded one layer at a time, then stacked
        (`stack_axes=1`), as quantize(stack, stack_axes=1) would store it."""
        stacked = is_stacked(path)
        key = self.tensors.prefix + flax_to_hf(path, 0 if stacked else None)[0]
        parts = self.layouts.get(key)
        if parts and not quantizable(path):
            raise LoraError(f"tensor '{key}' is stored quantised; only linear layers' kernels may "
                            f"be (not '{path}')")
        if not parts and not (self.quant and quantizable(path)):
            return self.tensors.read(path, shape, dtype, sharding)
        if not stacked:
            return _place(self._one(path, None, shape, dtype), sharding, path)
        layers = [self._one(path, i, shape[1:], dtype) for i in range(shape[0])]
        q = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *layers)
        return _place(dataclasses.replace(q, shape=tuple(shape), stack_axes=1), sharding, path)

    def _one(self, path: str, layer: int | None, shape: tuple[int, ...], dtype: Any) -> QuantizedWeight:
        """One layer's kernel (`shape` without the stack axis) as a QuantizedWeight."""
        key = self.tensors.prefix + flax_to_hf(path, layer)[0]
        parts = self.layouts.get(key)
        if parts:
            kind = stored_kind(key, parts)
            if self.quant not in (None, kind):
                raise LoraError(f"'{key}' is stored as {kind}; quant={self.quant!r} would quantise "
                                f"it again (pass quant=None or {kind!r})")
            self.tensors.used.update([key, *parts.values()])
            name = None if dtype is None else np.dtype(dtype).name
            return read_bnb(key, parts, self.tensors.read_raw, tuple(reversed(shape)),
                            name if name or kind != "int8" else self.int8_dtype)
        one_path = path if layer is None else unstack_path(path, layer)
        dense = self.tensors.read(one_path, shape, dtype, None)
        return quantize_jit(dense, kind=self.quant, transpose=True)


def _place(q: QuantizedWeight, sharding: Any, path: str) -> QuantizedWeight:
    """Every array of `q` on `sharding`'s devices, replicated; a sharding that splits the weight
    is refused (quantised weights are not sharded yet)."""
    if sharding is None:
        return jax.device_put(q, jax.devices()[0])
    if not sharding.is_fully_replicated:
        raise LoraError(f"'{path}' is quantised, and quantised weights are replicated; its "
                        f"sharding {sharding} splits it (use data parallelism, or no quant)")
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(q, sharding)
