"""`init` and `apply`: LoRA on any function `fn(params, *args)`, found by tracing, never by names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import Adapter, check_fits
from lora_jax.errors import LoraError
from lora_jax.interpreter import (
    Context,
    Layout,
    Tracked,
    Use,
    changed_message,
    eval_closed,
    is_tracked,
)
from lora_jax.paths import array_paths, flat_paths, nest
from lora_jax.quant.frozen import frozen, is_frozen, standins
from lora_jax.quant.weight import is_quantized
from lora_jax.rules import unfactorable_message
from lora_jax.spec import LoraSpec, changes_base
from lora_jax.variants import dora
from lora_jax.variants.pissa import principal_factors

PyTree = Any


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _weights(params: PyTree, abstract: bool = False) -> list[tuple[str, Any]]:
    """(path, leaf) of every weight; a QuantizedWeight is one leaf, shown as the shape and dtype
    of the weight it holds. Any other leaf must be an array (`array_paths` refuses the rest)."""
    array_paths(jax.tree.map(lambda x: x.codes if is_quantized(x) else x, params,
                             is_leaf=is_quantized), abstract)
    return flat_paths(standins(params))


def _values(params: PyTree) -> list[Any]:
    """The leaves the interpreter starts from: arrays, and each QuantizedWeight as a `Frozen`."""
    return [frozen(w, path) if is_quantized(w) else w
            for path, w in flat_paths(params, is_leaf=is_quantized)]


def _trace(fn: Callable, params: PyTree, args: Sequence[Any]):
    """The closed jaxpr of fn(params, *args); non-array args stay static Python values. A
    quantised weight is traced as a dense stand-in of its shape and dtype."""
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
        jax.tree_util.tree_map(spec, standins(params)), [spec(x) for x in dyn]
    )
    return closed, jax.tree_util.tree_structure(out_shape), dyn


def _discover(fn, params, args, targeted: set[str]) -> list[Use]:
    """How `fn` uses each targeted weight, traced abstractly (jax.eval_shape: nothing allocated)."""
    closed, _, dyn = _trace(fn, params, args)
    ctx = Context(uses=[])
    paths = [p for p, _ in _weights(params, abstract=True)]

    def run(flat_params, dyn):
        vals = [
            Tracked(w, None, None, path, tuple(range(w.ndim)), (), None, 1.0)
            if path in targeted else w
            for path, w in zip(paths, flat_params, strict=True)
        ]
        return eval_closed(closed, [*vals, *dyn], ctx)

    jax.eval_shape(run, _values(params), dyn)
    return ctx.uses


def _layout(path: str, shape: tuple[int, ...], uses: list[Use], allow_materialize: bool) -> Layout:
    """Adapter axes from how `fn` contracts the weight; every other use must fit them."""
    if not uses:
        raise LoraError(f"target '{path}' matches a parameter that the function never uses")
    for u in uses:
        if u.kind == "changed":
            raise LoraError(changed_message(path, u.prim, u.note))
    factorable = [u for u in uses if u.kind != "other"]
    others = [u for u in uses if u.kind == "other"]
    if others and not allow_materialize:
        raise LoraError(unfactorable_message(path, others[0].prim, others[0].note))
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


@dataclasses.dataclass(frozen=True)
class Planned:
    """What `init` builds for one targeted weight, or (`refusal`) why it cannot."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    rank: int
    layout: Layout | None
    refusal: str | None = None

    @property
    def a_shape(self) -> tuple[int, ...]:
        lay = self.layout
        return tuple(self.shape[j] for j in (*lay.stack, *lay.inputs)) + (self.rank,)

    @property
    def b_shape(self) -> tuple[int, ...]:
        lay = self.layout
        stack = tuple(self.shape[j] for j in lay.stack)
        return stack + (self.rank,) + tuple(self.shape[j] for j in lay.outputs)


def _plan_one(path: str, w: Any, uses: list[Use], spec: LoraSpec, allow_materialize: bool) -> Planned:
    shape, r = tuple(w.shape), spec.rank_for(path)
    try:
        lay = _layout(path, shape, uses, allow_materialize)
        n_in = math.prod(shape[j] for j in lay.inputs)
        n_out = math.prod(shape[j] for j in lay.outputs)
        if r > min(n_in, n_out):
            raise LoraError(
                f"rank {r} for '{path}' exceeds what its {n_in}x{n_out} map allows "
                f"(at most {min(n_in, n_out)})"
            )
    except LoraError as e:
        return Planned(path, shape, w.dtype, r, None, str(e))
    return Planned(path, shape, w.dtype, r, lay)


def plan(fn: Callable, params: PyTree, args: Sequence[Any], spec: LoraSpec,
         allow_materialize: bool = False) -> list[Planned]:
    """The adapter layout of every targeted weight, from one abstract trace; refusals are
    reported per weight, not raised (`init` raises the first, `describe` lists them all).
    `params` may hold `jax.ShapeDtypeStruct`s."""
    weights = dict(_weights(params, abstract=True))
    targeted = spec.select(list(weights))
    uses = _discover(fn, params, args, set(targeted))
    return [_plan_one(p, weights[p], [u for u in uses if u.path == p], spec, allow_materialize)
            for p in targeted]


def init(key: jax.Array, fn: Callable, params: PyTree, *example_args: Any, spec: LoraSpec,
         allow_materialize: bool = False) -> PyTree:
    """Adapters for every weight of `params` that `spec.targets` selects.

    `fn(params, *example_args)` is traced once; each targeted weight gets A [*stack, *inputs, r]
    and B [*stack, r, *outputs] from how it is actually contracted. A starts random, B at zero,
    except under spec.init "pissa"/"pissa_niter_K"/"olora": then A, B are W's principal factors
    and belong on `lora_jax.residual_base(params, adapters)` (lora_jax/variants/pissa.py).
    """
    planned = plan(fn, params, example_args, spec, allow_materialize)
    for pl in planned:
        if pl.refusal is not None:
            raise LoraError(pl.refusal)
    out = {}
    from_w = changes_base(spec.init)
    weights = dict(flat_paths(params, is_leaf=is_quantized)) if from_w or spec.dora else {}
    for i, pl in enumerate(planned):
        k = jax.random.fold_in(key, i)
        if from_w:  # PiSSA/OLoRA: A, B from W itself (pair with lora_jax.residual_base)
            lay = pl.layout
            a, b = principal_factors(k, weights[pl.path], pl.path, (lay.stack, lay.inputs, lay.outputs),
                                     pl.rank, spec.scale_for(pl.path), spec.init, spec.dtype)
        elif spec.init == "kaiming":  # PEFT's kaiming_uniform(a=√5): U(±1/√fan_in)
            bound = 1.0 / math.sqrt(math.prod(pl.shape[j] for j in pl.layout.inputs))
            a = jax.random.uniform(k, pl.a_shape, spec.dtype, -bound, bound)
        else:
            a = jax.random.normal(k, pl.a_shape, spec.dtype) / pl.rank
        if not from_w:
            b = jnp.zeros(pl.b_shape, spec.dtype)
        lay = pl.layout
        out[pl.path] = Adapter(a, b, spec.scale_for(pl.path), lay.stack, lay.inputs, lay.outputs,
                               spec.dropout)
    if spec.dora:  # m₀ = ‖W‖: the adapted weight at init is W (PEFT sets m after the LoRA init)
        out = dora.with_magnitudes({p: weights[p] for p in out}, out, spec.dtype)
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
    found = check_fits(dict(_weights(params)), adapters, stacked=adapter_index is not None)
    closed, out_tree, dyn = _trace(fn, params, args)
    vals, values = [], list(zip(_weights(params), _values(params), strict=True))
    factors = dora.factors({p: w for (p, _), w in values if p in found and found[p].is_dora}, found)
    for (path, _), w in values:
        ad = found.get(path)
        if ad is None:
            vals.append(w)
            continue
        lay = Layout(ad.stack, ad.inputs, ad.outputs)
        vals.append(Tracked(w, ad.a, ad.b, path, tuple(range(w.ndim)), (), lay, ad.scale,
                            ad.dropout, factors.get(path)))
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
        if is_tracked(x) or is_frozen(x):
            kind = "adapted" if is_tracked(x) else "quantised"
            raise LoraError(f"fn returns the {kind} weight '{x.path}' itself; return activations")
    return jax.tree_util.tree_unflatten(out_tree, outs)
