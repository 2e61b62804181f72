"""Quantise the targeted weights of a whole parameter tree, and undo it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from lora_jax.errors import LoraError
from lora_jax.paths import flat_paths, path_str
from lora_jax.quant.weight import QuantizedWeight, dequantize, is_quantized, quantize
from lora_jax.spec import LoraSpec

PyTree = Any


def quantize_params(
    params: PyTree,
    targets: str | Sequence[str],
    kind: str,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    transpose: bool = False,
    stack_axes: int = 0,
) -> PyTree:
    """`params` with every leaf whose path (as lora_jax.paths.flat_paths gives it) fullmatches
    one of `targets` replaced by quantize(leaf, kind, ...); the rest untouched.

    A target matching no path, or a matched leaf that is already quantised or not a float
    array, is a LoraError naming the path. For a Flax tree pass transpose=True (see quantize);
    for the stacked [L, ...] kernels of a scanned model pass stack_axes=1, so that each layer is
    quantised alone and a scan dequantises one layer at a time (quantise the unstacked weights
    of the same tree with a second call).
    """
    flat = flat_paths(params, is_leaf=is_quantized)
    chosen = set(LoraSpec(targets=targets).select([p for p, _ in flat]))

    def one(key_path: Any, leaf: Any) -> Any:
        path = path_str(key_path)
        if path not in chosen:
            return leaf
        if is_quantized(leaf):
            raise LoraError(f"params leaf '{path}' is already quantised ({leaf.kind})")
        try:
            return quantize(leaf, kind, blocksize, double_quant, transpose, stack_axes)
        except LoraError as e:
            raise LoraError(f"params leaf '{path}': {e}") from None

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def dequantize_params(params: PyTree, dtype: Any = None) -> PyTree:
    """Every QuantizedWeight in `params` dequantised (to its own dtype unless `dtype`)."""
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if isinstance(x, QuantizedWeight) else x,
        params,
        is_leaf=is_quantized,
    )
