"""`QuantizedWeight`, a frozen weight stored as bitsandbytes stores it, and `quantize`/`dequantize`."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.quant import blockwise, int8, torch_mean

KINDS = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
DTYPES = ("float32", "bfloat16", "float16")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "dtype", "kind", "blocksize", "transpose", "stack_axes"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight in bitsandbytes' layout; a pytree whose leaves are the arrays below.

    codes: nf4/fp4: uint8 [(n+1)//2], two 4-bit codes a byte, the even element in the high
      nibble (bitsandbytes' `weight`, there shaped [(n+1)//2, 1]); int8: int8, [rows, cols].
    absmax: nf4/fp4: float32 [ceil(n/blocksize)] per block, or with double quantisation its
      uint8 codes into the dynamic 8-bit map (`weight.absmax`); int8: SCB float32 [rows].
    nested_absmax, offset: double quantisation only: float32 [ceil(blocks/256)] and the float32
      mean that was subtracted from absmax (`weight.nested_absmax`, `nested_offset`).
    shape, dtype: the original array's; kind, blocksize: the format.
    transpose: the codes are of the original array transposed (a Flax [in, out] kernel stored as
      the PyTorch [out, in] weight); dequantize transposes back.
    stack_axes: how many leading axes of `shape` index a stack of layers (a scanned model's
      [L, in, out] kernel). Each layer is quantised on its own and every array above carries
      these axes first, so a scan can slice one layer's codes; `transpose` reverses the rest.
    """

    codes: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: str
    kind: str
    blocksize: int | None
    transpose: bool
    stack_axes: int = 0

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape the codes describe: the original's, its layer axes first and the rest
        reversed when `transpose`."""
        layers, rest = self.shape[: self.stack_axes], self.shape[self.stack_axes :]
        return layers + (rest[::-1] if self.transpose else rest)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def quantize(
    w: Any,
    kind: str,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    transpose: bool = False,
    stack_axes: int = 0,
) -> QuantizedWeight:
    """Quantise `w` as bitsandbytes does; jittable (kind, blocksize, double_quant, transpose and
    stack_axes are static).

    kind: "nf4" / "fp4" (bitsandbytes' quantize_4bit: absmax blocks of `blocksize` elements,
      default 64, over the row-major order; `double_quant` (default True) quantises the absmax
      again, as compress_statistics=True) or "int8" (LLM.int8's per-row absmax / 127, rows over
      the last axis; no blocksize or double_quant).
    transpose: quantise w.T (all axes reversed) instead. bitsandbytes blocks the PyTorch weight
      [out, in] row-major, so pass a Flax/JAX kernel [in, out] with transpose=True to get its
      blocks, and its bytes, exactly (and for int8 one scale per output unit). Blocks then run
      along the input axes of N-D kernels too (a DenseGeneral [embed, heads, dim] is stored as
      [dim, heads, embed]). dequantize returns the original layout either way.
    stack_axes: the leading axes that stack layers (1 for a scanned [L, in, out] kernel): each
      layer w[l] is quantised exactly as quantize(w[l], ...) would, and the results stacked.
    """
    w = jnp.asarray(w)
    blocksize, double_quant = _check(w, kind, blocksize, double_quant)
    _check_stack(w, stack_axes)
    if stack_axes:
        layers = w.shape[:stack_axes]
        dq = None if kind == "int8" else double_quant
        one = functools.partial(quantize, kind=kind, blocksize=blocksize, double_quant=dq,
                                transpose=transpose)
        q = jax.lax.map(one, w.reshape(-1, *w.shape[stack_axes:]))
        q = jax.tree.map(lambda x: x.reshape(*layers, *x.shape[1:]), q)
        return dataclasses.replace(q, shape=tuple(w.shape), stack_axes=stack_axes)
    shape, dtype = tuple(w.shape), w.dtype.name
    x = (w.T if transpose else w).astype(jnp.float32)
    nested_absmax = offset = None
    if kind == "int8":
        q, absmax = int8.quantize_rows(x.reshape(-1, x.shape[-1]))
        q = q.reshape(x.shape)
    else:
        q, absmax = blockwise.quantize_4bit(x.reshape(-1), kind, blocksize)
        if double_quant:
            offset = torch_mean.torch_cpu_mean(absmax, torch_mean.SUM_LANES)
            absmax, nested_absmax = blockwise.quantize_8bit(absmax - offset)
    return QuantizedWeight(q, absmax, nested_absmax, offset, shape, dtype, kind, blocksize, transpose)


def dequantize(q: QuantizedWeight, dtype: Any = None) -> jax.Array:
    """The weight back, in its original shape and `dtype` (default: the original dtype),
    computed in float32 and cast once at the end, as bitsandbytes."""
    if not is_quantized(q):
        raise LoraError(f"dequantize needs a QuantizedWeight; got {type(q).__qualname__}")
    out_dtype = _float_dtype(q.dtype if dtype is None else dtype, "dequantize dtype")
    if q.stack_axes:  # each layer on its own, as it was quantised
        layers = q.shape[: q.stack_axes]
        one = dataclasses.replace(q, shape=q.shape[q.stack_axes :], stack_axes=0)
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[q.stack_axes :]), one)
        w = jax.vmap(lambda layer: dequantize(layer, out_dtype))(flat)
        return w.reshape(*layers, *w.shape[1:])
    if q.kind == "int8":
        x = int8.dequantize_rows(q.codes.reshape(-1, q.codes.shape[-1]), q.absmax)
    else:
        absmax = q.absmax
        if q.double_quant:
            absmax = blockwise.dequantize_nested_absmax(absmax, q.nested_absmax, q.offset)
        x = blockwise.dequantize_4bit(q.codes, absmax, q.kind, q.blocksize, math.prod(q.shape))
    x = x.reshape(q.stored_shape)
    return (x.T if q.transpose else x).astype(out_dtype)


def _float_dtype(dtype: Any, what: str) -> jnp.dtype:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in DTYPES:
        raise LoraError(f"{what} is {name}; expected one of {', '.join(DTYPES)}")
    return jnp.dtype(name)


def _check_stack(w: jax.Array, stack_axes: Any) -> None:
    if not isinstance(stack_axes, int) or isinstance(stack_axes, bool) or not 0 <= stack_axes < w.ndim:
        raise LoraError(f"stack_axes={stack_axes!r} for a weight of shape {tuple(w.shape)}; expected "
                        f"an int from 0 to {w.ndim - 1} (the leading axes that stack layers)")


def _check(w: jax.Array, kind: Any, blocksize: Any, double_quant: Any) -> tuple[int | None, bool]:
    """Refuse what bitsandbytes refuses; fill in the 4-bit defaults."""
    if kind not in KINDS:
        raise LoraError(f"quantisation kind {kind!r}; expected one of {', '.join(KINDS)}")
    _float_dtype(w.dtype, f"the weight's dtype ({kind} quantises float weights)")
    if w.ndim == 0 or w.size == 0:
        raise LoraError(f"weight of shape {tuple(w.shape)}; expected at least one dimension and one element")
    if kind == "int8":
        if blocksize is not None or double_quant is not None:
            raise LoraError("int8 quantises whole rows; blocksize and double_quant apply to nf4/fp4 only")
        return None, False
    blocksize = 64 if blocksize is None else blocksize
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise LoraError(f"blocksize={blocksize!r}; bitsandbytes allows {', '.join(map(str, BLOCKSIZES))}")
    double_quant = True if double_quant is None else double_quant
    if not isinstance(double_quant, bool):
        raise LoraError(f"double_quant={double_quant!r}; expected True or False")
    return blocksize, double_quant
