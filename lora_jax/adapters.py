"""The adapter tree: one `Adapter(a, b)` per targeted weight, placed at that weight's path.

A weight W is split into three groups of axes (numbers are W's own axes):
  stack   -- axes W is stacked on (a scanned layer axis, a dot_general batch axis);
  inputs  -- axes W is contracted over where it is used (Dense "in", conv window + in-channels,
             the vocabulary axis of a gathered embedding);
  outputs -- every other axis.
Then A has shape [*stack, *inputs, r] and B [*stack, r, *outputs], and
ΔW = scale · A·B (contracted over r) laid out back in W's axis order. A DoRA adapter also has a
magnitude m [*stack, *outputs] (lora_jax/variants/dora.py): W' = m/‖W + ΔW‖ · (W + ΔW).
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.errors import LoraError
from lora_jax.paths import flat_paths, nest, path_str
from lora_jax.quant.tree import dequantize_params
from lora_jax.quant.weight import is_quantized
from lora_jax.variants import dora

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """Low-rank factors of one weight. Only `a`, `b` and `m` are pytree leaves; the rest is static."""

    a: Any  # [*stack, *inputs, r]
    b: Any  # [*stack, r, *outputs]
    scale: float = dataclasses.field(metadata=dict(static=True))
    stack: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    inputs: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    outputs: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    m: Any = None  # DoRA's magnitude [*stack, *outputs]; None for plain LoRA

    @property
    def is_dora(self) -> bool:
        return self.m is not None

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def w_ndim(self) -> int:
        return len(self.stack) + len(self.inputs) + len(self.outputs)

    def delta(self, dtype: Any = None) -> jax.Array:
        """ΔW = scale·A·B in W's axis layout (materialised: for merging and checks only)."""
        labels = string.ascii_letters[: self.w_ndim]
        r = "Z"
        stack = "".join(labels[i] for i in self.stack)
        a_in = "".join(labels[i] for i in self.inputs)
        b_out = "".join(labels[i] for i in self.outputs)
        spec = f"{stack}{a_in}{r},{stack}{r}{b_out}->{labels}"
        a, b = self.a, self.b
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        return jnp.einsum(spec, a * self.scale, b)

    def expected_shapes(self, w_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        stack = tuple(w_shape[i] for i in self.stack)
        a = stack + tuple(w_shape[i] for i in self.inputs) + (self.rank,)
        b = stack + (self.rank,) + tuple(w_shape[i] for i in self.outputs)
        return a, b


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def adapter_items(adapters: PyTree) -> list[tuple[str, Adapter]]:
    """(path, Adapter) pairs of an adapter tree, paths as in the params tree."""
    return [(p, a) for p, a in flat_paths(adapters, is_leaf=is_adapter) if is_adapter(a)]


def check_fits(params: PyTree, adapters: PyTree, stacked: bool = False) -> dict[str, Adapter]:
    """Map path -> Adapter, refusing adapters whose path or shapes do not fit `params`.

    `stacked`: the adapters are a stack of K (from `lora_jax.stack_adapters`), A and B carrying
    a leading adapter axis.
    """
    weights = dict(flat_paths(params))
    found = {}
    for path, ad in adapter_items(adapters):
        if path not in weights:
            raise LoraError(f"adapter for '{path}' has no matching weight in params")
        w_shape = tuple(weights[path].shape)
        if ad.w_ndim != len(w_shape):
            raise LoraError(
                f"adapter for '{path}' is laid out for a {ad.w_ndim}-d weight, "
                f"but the weight has shape {w_shape}"
            )
        want_a, want_b = ad.expected_shapes(w_shape)
        if stacked:
            k = ad.a.shape[0] if ad.a.ndim else 0
            want_a, want_b = (k, *want_a), (k, *want_b)
        if tuple(ad.a.shape) != want_a or tuple(ad.b.shape) != want_b:
            raise LoraError(
                f"adapter for '{path}' has A {tuple(ad.a.shape)}, B {tuple(ad.b.shape)}; "
                f"weight {w_shape} needs A {want_a}, B {want_b}"
            )
        if ad.is_dora:
            if stacked:
                raise LoraError(f"adapter for '{path}' is a DoRA adapter; a stack of adapters for a "
                                "mixed batch holds plain LoRA adapters only")
            want_m = dora.m_shape(ad, w_shape)
            if tuple(ad.m.shape) != want_m:
                raise LoraError(f"DoRA adapter for '{path}' has magnitude {tuple(ad.m.shape)}; "
                                f"weight {w_shape} needs {want_m}")
        found[path] = ad
    return found


def _fold(params: PyTree, adapters: PyTree, sign: float, norms: dict | None = None,
          norms_out: dict | None = None) -> PyTree:
    found = check_fits(params, adapters)
    missing = sorted(p for p, ad in found.items() if ad.is_dora and sign < 0 and p not in (norms or {}))
    if missing:
        raise LoraError(f"unmerging the DoRA adapter of '{missing[0]}' needs the norms ‖W + ΔW‖ that "
                        "merge computed (merged, norms = lora_jax.merge(params, adapters, "
                        "return_norms=True)); the merged weight alone does not determine them")

    def fold(key_path, w):
        path = path_str(key_path)
        ad = found.get(path)
        if ad is None:
            return w
        if ad.is_dora and sign > 0:
            out, norms_out[path] = dora.merged_weight(w, ad)
            return out.astype(w.dtype)
        if ad.is_dora:
            return dora.unmerged_weight(w, ad, norms[path]).astype(w.dtype)
        delta = ad.delta(jnp.promote_types(w.dtype, jnp.float32))
        return (w.astype(delta.dtype) + sign * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(fold, params)


def merge(params: PyTree, adapters: PyTree, return_norms: bool = False) -> PyTree:
    """Params with s·A·B folded into each targeted weight (computed in fp32, cast back).

    Merged inference costs exactly the base's forward. In bf16 the sum is rounded to bf16, so
    `unmerge(merge(p, a), a)` differs from p by up to half a bf16 ulp of w + ΔW plus half of w's:
    at most 2⁻⁸·(|w + ΔW| + |w|) per weight (in fp32, by fp32 rounding only).
    Quantised weights (lora_jax.quant) are dequantised first: the result is a dense tree.
    A DoRA adapter merges as m/‖W + ΔW‖ · (W + ΔW); `return_norms` also returns {path: ‖W + ΔW‖},
    which `unmerge` needs for DoRA adapters: (merged, norms).
    """
    norms: dict[str, jax.Array] = {}
    merged = _fold(dequantize_params(params), adapters, 1.0, norms_out=norms)
    return (merged, norms) if return_norms else merged


def unmerge(merged: PyTree, adapters: PyTree, norms: dict | None = None) -> PyTree:
    """The base params back from merged ones (exact to fp32 rounding); DoRA adapters need the
    `norms` that `merge(..., return_norms=True)` returned."""
    return _fold(merged, adapters, -1.0, norms=norms)


def count_params(tree: PyTree) -> int:
    """Number of scalars in a tree of arrays (adapters or params); a quantised weight counts the
    weights it stands for, not its codes."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))


def trainable_fraction(params: PyTree, adapters: PyTree) -> float:
    """Adapter parameters as a fraction of the base model's parameters."""
    return count_params(adapters) / max(count_params(params), 1)


def adapter_shardings(adapters: PyTree, param_shardings: PyTree) -> PyTree:
    """A/B (and DoRA m) shardings from the base weights' NamedShardings.

    A takes the specs of W's stack and contracted axes, B and m those of W's stack and output
    axes; the rank axis is replicated. The result has the structure of `adapters`.
    """
    # a quantised weight's shardings come as a QuantizedWeight of its arrays' (all alike: replicated)
    by_path = {p: jax.tree.leaves(s)[0] if is_quantized(s) else s for p, s in flat_paths(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding) or is_quantized(x))}
    out = {}
    for path, ad in adapter_items(adapters):
        if path not in by_path:
            raise LoraError(f"no sharding given for the weight of adapter '{path}'")
        sh = by_path[path]
        spec = tuple(sh.spec) + (None,) * (ad.w_ndim - len(sh.spec))
        stack = [spec[i] for i in ad.stack]
        a_spec = PartitionSpec(*stack, *(spec[i] for i in ad.inputs), None)
        b_spec = PartitionSpec(*stack, None, *(spec[i] for i in ad.outputs))
        m = None if ad.m is None else NamedSharding(sh.mesh, PartitionSpec(
            *stack, *(spec[i] for i in ad.outputs)))
        out[path] = dataclasses.replace(
            ad, a=NamedSharding(sh.mesh, a_spec), b=NamedSharding(sh.mesh, b_spec), m=m
        )
    return nest(out)
