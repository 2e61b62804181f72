"""`init` and `apply`: LoRA on any function `fn(params, *args)`, found by tracing, never by names."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import Adapter, check_fits
from lora_jax.errors import LoraError
from lora_jax.interpreter import Context, Layout, Tracked, Use, eval_closed, is_tracked
from lora_jax.paths import flat_paths, nest
from lora_jax.spec import LoraSpec

PyTree = Any


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _trace(fn: Callable, params: PyTree, args: Sequence[Any]):
    """The closed jaxpr of fn(params, *args); non-array args stay static Python values."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    dyn_idx = [i for i, x in enumerate(leaves) if _is_array(x)]

    def flat_fn(p, dyn):
        full = list(leaves)
        for i, x in zip(dyn_idx, dyn, strict=True):
            full[i] = x
        return fn(p, *jax.tree_util.tree_unflatten(treedef, full))

    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    dyn = [leaves[i] for i in dyn_idx]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
        jax.tree_util.tree_map(spec, params), [spec(x) for x in dyn]
    )
    return closed, jax.tree_util.tree_structure(out_shape), dyn


def _discover(fn, params, args, targeted: set[str]) -> list[Use]:
    closed, _, dyn = _trace(fn, params, args)
    ctx = Context(uses=[])
    paths = [p for p, _ in flat_paths(params)]

    def run(flat_params, dyn):
        vals = [
            Tracked(w, None, None, path, tuple(range(w.ndim)), (), None, 1.0)
            if path in targeted else w
            for path, w in zip(paths, flat_params, strict=True)
        ]
        return eval_closed(closed, [*vals, *dyn], ctx)

    jax.eval_shape(run, jax.tree_util.tree_leaves(params), dyn)
    return ctx.uses


def _layout(path: str, shape: tuple[int, ...], uses: list[Use], allow_materialize: bool) -> Layout:
    """Adapter axes from how `fn` contracts the weight; every other use must fit them."""
    if not uses:
        raise LoraError(f"target '{path}' matches a parameter that the function never uses")
    factorable = [u for u in uses if u.kind != "other"]
    others = [u for u in uses if u.kind == "other"]
    if others and not allow_materialize:
        raise LoraError(
            f"weight '{path}' reaches '{others[0].prim}', which LoRA cannot factor; "
            "pass allow_materialize=True to form W+ΔW there"
        )
    if not factorable:  # only materialised uses: split W as [all but last axis] x [last axis]
        return Layout((), tuple(range(len(shape) - 1)), (len(shape) - 1,))
    gathers = [u for u in factorable if u.kind == "gather"]
    main = (gathers or factorable)[0]
    stack = tuple(sorted(set(main.sliced) | main.batch))
    inputs = tuple(sorted(main.contract))
    outputs = tuple(i for i in range(len(shape)) if i not in stack and i not in inputs)
    for u in factorable:
        direct = u.contract == frozenset(inputs)
        transposed = u.kind == "dot" and u.contract == frozenset(outputs)
        if not (direct or transposed) or not (set(u.sliced) | u.batch) <= set(stack):
            raise LoraError(
                f"weight '{path}' is contracted over axes {sorted(u.contract)} by {u.prim} but "
                f"over {list(inputs)} by {main.prim}; one adapter cannot factor both uses"
            )
    return Layout(stack, inputs, outputs)


def init(key: jax.Array, fn: Callable, params: PyTree, *example_args: Any, spec: LoraSpec,
         allow_materialize: bool = False) -> PyTree:
    """Adapters for every weight of `params` that `spec.targets` selects.

    `fn(params, *example_args)` is traced once; each targeted weight gets A [*stack, *inputs, r]
    and B [*stack, r, *outputs] from how it is actually contracted. A starts random, B at zero.
    """
    weights = dict(flat_paths(params))
    targeted = spec.select(list(weights))
    uses = _discover(fn, params, example_args, set(targeted))
    out = {}
    for i, path in enumerate(targeted):
        shape = tuple(weights[path].shape)
        lay = _layout(path, shape, [u for u in uses if u.path == path], allow_materialize)
        r = spec.rank_for(path)
        n_in = math.prod(shape[j] for j in lay.inputs)
        n_out = math.prod(shape[j] for j in lay.outputs)
        if r > min(n_in, n_out):
            raise LoraError(
                f"rank {r} for '{path}' exceeds what its {n_in}x{n_out} map allows "
                f"(at most {min(n_in, n_out)})"
            )
        stack = tuple(shape[j] for j in lay.stack)
        a_shape = stack + tuple(shape[j] for j in lay.inputs) + (r,)
        b_shape = stack + (r,) + tuple(shape[j] for j in lay.outputs)
        k = jax.random.fold_in(key, i)
        if spec.init == "kaiming":  # PEFT's kaiming_uniform(a=√5): U(±1/√fan_in)
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(k, a_shape, spec.dtype, -bound, bound)
        else:
            a = jax.random.normal(k, a_shape, spec.dtype) / r
        b = jnp.zeros(b_shape, spec.dtype)
        out[path] = Adapter(a, b, spec.scale_for(path), lay.stack, lay.inputs, lay.outputs,
                            spec.dropout)
    return nest(out)


def apply(fn: Callable, params: PyTree, adapters: PyTree, *args: Any, rng: jax.Array | None = None,
          deterministic: bool = True, allow_materialize: bool = False,
          adapter_index: jax.Array | None = None) -> Any:
    """fn(params, *args) with y = x·W + s·((x·A)·B) at every use of an adapted weight.

    W + ΔW is never formed unless `allow_materialize` is set and a use cannot be factored.
    Each adapter's dropout (from its spec) hits the LoRA branch's input when `rng` is given and
    `deterministic` is False. With `adapter_index` (int [batch]; -1 = no adapter), `adapters` is
    a stack from `lora_jax.stack_adapters` and example b uses adapter adapter_index[b].
    The branch computes in the activations' dtype (bf16 activations: bf16 matmuls, as torch
    autocast does for PEFT); A and B keep their own dtype and get gradients in it.
    """
    found = check_fits(params, adapters, stacked=adapter_index is not None)
    closed, out_tree, dyn = _trace(fn, params, args)
    vals = []
    for path, w in flat_paths(params):
        ad = found.get(path)
        if ad is None:
            vals.append(w)
            continue
        lay = Layout(ad.stack, ad.inputs, ad.outputs)
        vals.append(Tracked(w, ad.a, ad.b, path, tuple(range(w.ndim)), (), lay, ad.scale,
                            ad.dropout))
    use_dropout = rng is not None and not deterministic
    ctx = Context(allow_materialize=allow_materialize, rng=rng if use_dropout else None)
    if adapter_index is not None:
        index = jnp.asarray(adapter_index)
        if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
            raise LoraError(
                f"adapter_index must be a 1-d integer array; got {index.dtype}{list(index.shape)}"
            )
        ctx.rows, ctx.row_mask = jnp.maximum(index, 0), index >= 0
    outs = eval_closed(closed, [*vals, *dyn], ctx)
    for x in outs:
        if is_tracked(x):
            raise LoraError(f"fn returns the adapted weight '{x.path}' itself; return activations")
    return jax.tree_util.tree_unflatten(out_tree, outs)
