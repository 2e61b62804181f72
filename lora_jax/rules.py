"""Rules for equations that touch a targeted weight.

Consumers compute y = op(x, W) + s·op'(op(x, A), B): the base op on W as written, plus the
low-rank branch through the rank-r bottleneck. Axis bookkeeping uses einsum labels: every axis of
W's view carries the label of its original axis, A and B carry the same labels plus the rank
label, so stacked, batched and multi-axis contractions all fall out of one code path.
"""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp

from lora_jax import expert_rules
from lora_jax.errors import LoraError
from lora_jax.interpreter import HIGHER_ORDER, Context, Tracked, Use, bind, is_tracked
from lora_jax.quant import consume
from lora_jax.variants import dora

R = "Z"  # einsum label of the rank axis
EX = "Y"  # einsum label of the example axis in a mixed-adapter batch
_LABELS = string.ascii_letters.replace(R, "").replace(EX, "")


# ---------------------------------------------------------------- views of W


def _transpose(eqn, invals, ctx):
    (t,) = invals
    perm = eqn.params["permutation"]
    w = consume.view_w(eqn, t.w)
    return dataclasses.replace(t, w=w, w_axes=tuple(t.w_axes[i] for i in perm))


def _convert(eqn, invals, ctx):
    (t,) = invals
    dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.floating):
        return _unsupported(eqn, invals, ctx)
    w = consume.view_w(eqn, t.w)
    if ctx.discovering:
        return dataclasses.replace(t, w=w)
    return dataclasses.replace(t, w=w, a=t.a.astype(dtype), b=t.b.astype(dtype))


def _on_w_only(eqn, invals, ctx):
    """Ops that change where or how W is held, not its values (sharding, copies)."""
    (t,) = invals
    return dataclasses.replace(t, w=consume.view_w(eqn, t.w))


# ---------------------------------------------------------------- materialising fallback


def _delta_view(t: Tracked) -> jax.Array:
    """s·A·B laid out like the current view of W."""
    lab = {o: _LABELS[o] for o in range(len(t.w_axes) + len(t.sliced))}
    a_lab = "".join(lab[o] for o in (*t.stack_left, *t.layout.inputs)) + R
    b_lab = "".join(lab[o] for o in t.stack_left) + R + "".join(lab[o] for o in t.layout.outputs)
    out = "".join(lab[o] for o in t.w_axes)
    return jnp.einsum(f"{a_lab},{b_lab}->{out}", t.a * t.scale, t.b).astype(t.w.dtype)


def _materialized(t: Tracked) -> jax.Array:
    """W + ΔW (DoRA: times g) in the current view of W."""
    full = t.w + _delta_view(t)
    if t.g is None:
        return full
    g = dora.along(t.g, [t.w_axes.index(o) for o in (*t.stack_left, *t.layout.outputs)], t.w.ndim)
    return (full * g).astype(t.w.dtype)


def _unsupported(eqn, invals, ctx: Context, note: str = ""):
    name = eqn.primitive.name
    tracked = [x for x in invals if is_tracked(x)]
    if ctx.discovering:
        ctx.uses.extend(Use(t.path, name, "other", note=note) for t in tracked)
        invals = [x.w if is_tracked(x) else x for x in invals]
    elif ctx.allow_materialize and ctx.rows is None:
        invals = [_materialized(x) if is_tracked(x) else x for x in invals]
    else:
        raise LoraError(unfactorable_message(tracked[0].path, name, note))
    return bind(eqn, invals)


def unfactorable_message(path: str, prim: str, note: str = "") -> str:
    why = f" ({note})" if note else ""
    return (f"weight '{path}' reaches '{prim}'{why}, which LoRA cannot factor; "
            "pass allow_materialize=True to form W+ΔW there")


# ---------------------------------------------------------------- consumers


def _dropout(x, t: Tracked, ctx: Context):
    key = ctx.next_key() if t.dropout > 0.0 else None
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - t.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - t.dropout), jnp.zeros_like(x))


def _dot_general(eqn, invals, ctx):
    lhs, rhs = invals
    if is_tracked(lhs) == is_tracked(rhs):
        return _unsupported(eqn, invals, ctx)
    w_side = 0 if is_tracked(lhs) else 1
    t, x = (lhs, rhs) if w_side == 0 else (rhs, lhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc = (lc, rc) if w_side == 0 else (rc, lc)
    wb, xb = (lb, rb) if w_side == 0 else (rb, lb)
    contract = frozenset(t.w_axes[i] for i in wc)
    batch = frozenset(t.w_axes[i] for i in wb)
    if ctx.discovering:
        free = frozenset(t.w_axes) - contract - batch
        ctx.uses.append(Use(t.path, "dot_general", "dot", contract, batch, free, t.sliced))
        return eqn.primitive.bind(*_with_w(invals), **eqn.params)
    lay = t.layout
    if contract == frozenset(lay.inputs):
        direct = True
    elif contract == frozenset(lay.outputs):  # W used transposed, e.g. a tied output head
        direct = False
    elif ctx.allow_materialize:
        return _unsupported(eqn, invals, ctx)
    else:
        raise LoraError(
            f"adapter for '{t.path}' factors W over axes {list(lay.inputs)}, but here W is "
            f"contracted over axes {sorted(contract)}; create the adapter with lora_jax.init on "
            "this function"
        )
    # Labels: W's axes by original axis; x's contracted/batch axes share W's labels.
    w_lab = {o: _LABELS[o] for o in range(len(t.w_axes) + len(t.sliced))}
    x_lab = list(_LABELS[len(w_lab) : len(w_lab) + x.ndim])
    for xi, wi in zip((*xc, *xb), (*wc, *wb), strict=True):
        x_lab[xi] = w_lab[t.w_axes[wi]]
    if ctx.rows is not None:
        _check_rows(t, x, 0 in (*xc, *xb), ctx)
        x_lab[0] = EX
    x_keep = [x_lab[i] for i in range(x.ndim) if i not in xc]
    stack_extra = [w_lab[o] for o in t.stack_left if w_lab[o] not in x_keep]
    stack_lab = "".join(w_lab[o] for o in t.stack_left)
    a_lab = stack_lab + "".join(w_lab[o] for o in lay.inputs) + R
    b_lab = stack_lab + R + "".join(w_lab[o] for o in lay.outputs)
    a, b = t.a, t.b
    if ctx.rows is not None:  # each example gathers its own adapter's factors (BGMV)
        a, b, a_lab, b_lab = a[ctx.rows], b[ctx.rows], EX + a_lab, EX + b_lab
    (first, first_lab), (second, second_lab) = ((a, a_lab), (b, b_lab))[:: 1 if direct else -1]
    mid_lab = "".join(x_keep + stack_extra) + R
    # dot_general's output order: batch, lhs free, rhs free.
    w_free = [w_lab[t.w_axes[i]] for i in range(len(t.w_axes)) if i not in (*wc, *wb)]
    x_free = [x_lab[i] for i in range(x.ndim) if i not in (*xc, *xb)]
    batch_lab = [x_lab[i] for i in xb]
    out_lab = "".join(batch_lab + (w_free + x_free if w_side == 0 else x_free + w_free))
    g_pos = None
    if t.g is not None:  # DoRA: g along W's stack and output axes
        g_lab = [w_lab[o] for o in (*t.stack_left, *lay.outputs)]
        if direct:
            g_pos = dora.positions(t.path, g_lab, out_lab)
        else:  # W used transposed: x meets W's outputs, scaled there as the merged W' does it
            x = x * dora.along(t.g, dora.positions(t.path, g_lab, x_lab), x.ndim).astype(x.dtype)
            invals = [t, x] if w_side == 0 else [x, t]
    base = eqn.primitive.bind(*_with_w(invals), **eqn.params)

    prec = eqn.params.get("precision")
    pref = eqn.params.get("preferred_element_type")
    x_in = _dropout(x, t, ctx)
    if jnp.issubdtype(x.dtype, jnp.floating):  # branch in the activations' dtype, as autocast does
        first = first.astype(x.dtype)
    mid = jnp.einsum(f"{''.join(x_lab)},{first_lab}->{mid_lab}", x_in, first, precision=prec,
                     preferred_element_type=pref)
    mid = mid * jnp.asarray(t.scale, mid.dtype)
    if ctx.rows is not None:  # rows with index -1 get no adapter
        mid = mid * ctx.row_mask.astype(mid.dtype).reshape((-1,) + (1,) * (mid.ndim - 1))
    delta = jnp.einsum(f"{mid_lab},{second_lab}->{out_lab}", mid, second.astype(mid.dtype),
                       precision=prec, preferred_element_type=pref)
    if g_pos is not None:
        dropped = None if x_in is x else eqn.primitive.bind(
            *_with_w([t, x_in] if w_side == 0 else [x_in, t]), **eqn.params)
        return dora.rescale(t.g, g_pos, base, delta, dropped)
    return base + delta.astype(base.dtype)

def _check_rows(t: Tracked, x, example_axis_used: bool, ctx: Context) -> None:
    if example_axis_used or x.ndim == 0 or x.shape[0] != ctx.rows.shape[0]:
        raise LoraError(
            f"a mixed-adapter batch needs the {ctx.rows.shape[0]} examples on the leading axis of "
            f"the activations that meet '{t.path}', but they have shape {tuple(x.shape)}"
        )


def _with_w(invals):
    return [x.w if is_tracked(x) else x for x in invals]


def _as_kernel(t: Tracked, a):
    """A laid out like W's view: input axes where W has them, the rank axis at W's first output
    axis (in view order) and size-1 axes at its other output axes."""
    outs = [o for o in t.w_axes if o in t.layout.outputs]
    a = a.reshape(a.shape + (1,) * (len(outs) - 1))
    pos = {o: i for i, o in enumerate(t.layout.inputs)}
    pos.update({o: len(pos) + k for k, o in enumerate(outs)})
    return jnp.transpose(a, [pos[o] for o in t.w_axes])


def _kernel_sizes(t: Tracked, sizes, rank: int) -> tuple[int, ...]:
    """Slice sizes for `_as_kernel`'s array: W's on input axes, all of the rank axis, 1 else."""
    first_out = next(o for o in t.w_axes if o in t.layout.outputs)
    return tuple(rank if o == first_out else 1 if o in t.layout.outputs else s
                 for o, s in zip(t.w_axes, sizes, strict=True))


def _to_outputs(mid, t: Tracked, out_pos: dict[int, int], b, mixed: bool = False):
    """s·mid·B: `mid` (an op on `_as_kernel`'s array) holds the rank where the op's output holds
    W's first output axis; `out_pos` maps each original output axis to its output position.
    `mixed`: axis 0 of `mid` is the example axis and `b` has one B per example."""
    labels = iter(_LABELS)
    mid_lab = [next(labels) for _ in range(mid.ndim)]
    out_lab = list(mid_lab)
    w_lab = {o: next(labels) for o in t.layout.outputs}
    for o, i in out_pos.items():
        out_lab[i] = w_lab[o]
    mid_lab[out_pos[next(o for o in t.w_axes if o in out_pos)]] = R  # other outputs: size 1, summed
    b_lab = R + "".join(w_lab[o] for o in t.layout.outputs)
    if mixed:
        mid_lab[0] = out_lab[0] = EX
        b_lab = EX + b_lab
    mid = mid * jnp.asarray(t.scale, mid.dtype)
    return jnp.einsum(f"{''.join(mid_lab)},{b_lab}->{''.join(out_lab)}", mid, b.astype(mid.dtype))


def _conv(eqn, invals, ctx):
    x, t = invals
    p = eqn.params
    if is_tracked(x):
        return _unsupported(eqn, invals, ctx)
    for group in ("feature_group_count", "batch_group_count"):
        if p[group] != 1:
            return _unsupported(eqn, invals, ctx, f"a grouped conv with {group}={p[group]}: "
                                "each group would need its own adapter")
    dn = p["dimension_numbers"]
    out_feat, in_feat, *spatial = dn.rhs_spec
    contract = frozenset(t.w_axes[i] for i in (in_feat, *spatial))
    free = frozenset([t.w_axes[out_feat]])
    if ctx.discovering:
        ctx.uses.append(Use(t.path, "conv_general_dilated", "conv", contract, frozenset(), free,
                            t.sliced))
        return eqn.primitive.bind(x, t.w, **p)
    if t.stack_left or contract != frozenset(t.layout.inputs) or ctx.rows is not None:
        return _unsupported(eqn, invals, ctx)
    base = eqn.primitive.bind(x, t.w, **p)
    kernel_a = _as_kernel(t, t.a).astype(t.w.dtype)
    x_in = _dropout(x, t, ctx)
    mid = eqn.primitive.bind(x_in, kernel_a, **p)
    delta = _to_outputs(mid, t, {t.w_axes[out_feat]: dn.out_spec[1]}, t.b)
    if t.g is not None:
        dropped = None if x_in is x else eqn.primitive.bind(x_in, t.w, **p)
        return dora.rescale(t.g, [dn.out_spec[1]], base, delta, dropped)
    return base + delta.astype(base.dtype)


# ---------------------------------------------------------------- lookups (embeddings)
#
# A lookup reads rows of W: gather (W[ids], jnp.take, vmap(lambda i: W[i])) or dynamic_slice
# (W[i] with a traced scalar i). An axis read whole -- its slice is its full size and it is not
# collapsed -- is not indexed (its start clamps to 0): it is an output axis. The other axes are
# indexed; A has them too, so the same lookup on A, with the rank axis in place of the outputs,
# gives x·A, and B maps that to the outputs.


def _lookup_axes(t: Tracked, sizes, collapsed=()) -> tuple[list[int], list[int]]:
    """(indexed, whole) axes of W's view for a lookup with these slice sizes."""
    whole = [i for i, n in enumerate(t.w.shape) if sizes[i] == n and i not in collapsed]
    return [i for i in range(t.w.ndim) if i not in whole], whole


def _lookup_use(t: Tracked, prim: str, indexed, whole, ctx: Context) -> bool:
    """Record the lookup in discovery; False when this adapter cannot take it factored."""
    contract = frozenset(t.w_axes[i] for i in indexed)
    if ctx.discovering:
        ctx.uses.append(Use(t.path, prim, "gather", contract, frozenset(),
                            frozenset(t.w_axes[i] for i in whole), t.sliced))
        return True
    return not t.stack_left and contract == frozenset(t.layout.inputs)


def _gather(eqn, invals, ctx):
    t, idx = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if is_tracked(idx) or dn.operand_batching_dims:
        return _unsupported(eqn, invals, ctx)
    indexed, whole = _lookup_axes(t, p["slice_sizes"], dn.collapsed_slice_dims)
    if not whole:
        return _unsupported(eqn, invals, ctx, "a lookup of single elements, no whole axis")
    if not indexed or not _lookup_use(t, "gather", indexed, whole, ctx):
        return _unsupported(eqn, invals, ctx)
    base = eqn.primitive.bind(t.w, idx, **p)
    if ctx.discovering:
        return base
    kept = [i for i in range(t.w.ndim) if i not in dn.collapsed_slice_dims]
    out_pos = {t.w_axes[i]: dn.offset_dims[kept.index(i)] for i in whole}
    rank = t.a.shape[-1]
    kp = {**p, "slice_sizes": _kernel_sizes(t, p["slice_sizes"], rank)}
    if p["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
        kp["fill_value"] = 0  # a dropped row gets W's fill value and no LoRA branch
    if ctx.rows is None:
        mid = eqn.primitive.bind(_as_kernel(t, t.a), idx, **kp)
        return _lookup_out(t, base, _to_outputs(mid, t, out_pos, t.b), out_pos)
    # Mixed batch: the K tables stacked along the indexed axis, read at row k·V + id.
    if len(indexed) != 1 or indexed[0] not in dn.start_index_map or 0 in dn.offset_dims \
            or idx.ndim < 2 or idx.shape[0] != ctx.rows.shape[0]:
        raise LoraError(
            f"a mixed-adapter batch needs a lookup into '{t.path}' that indexes one axis with "
            f"the {ctx.rows.shape[0]} examples on the leading axis of the ids; got ids of shape "
            f"{tuple(idx.shape)} indexing axes {indexed}"
        )
    (ax,) = indexed
    tables = jnp.moveaxis(jax.vmap(lambda a: _as_kernel(t, a))(t.a), 0, ax)
    flat = tables.reshape(*tables.shape[:ax], -1, *tables.shape[ax + 2 :])
    j = dn.start_index_map.index(ax)
    v, size = t.w.shape[ax], p["slice_sizes"][ax]
    start = idx[..., j]
    if p["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
        start = jnp.where((start >= 0) & (start <= v - size), start, -1)  # dropped in flat too
    else:
        start = jnp.clip(start, 0, v - size)  # where the base's clamping puts it
    rows = ctx.rows.astype(idx.dtype).reshape((-1,) + (1,) * (start.ndim - 1))
    start = jnp.where(start >= 0, start + rows * v, start)
    mid = eqn.primitive.bind(flat, idx.at[..., j].set(start), **kp)
    mid = mid * ctx.row_mask.astype(mid.dtype).reshape((-1,) + (1,) * (mid.ndim - 1))
    return base + _to_outputs(mid, t, out_pos, t.b[ctx.rows], mixed=True).astype(base.dtype)


def _dynamic_slice(eqn, invals, ctx):
    t, *starts = invals
    sizes = eqn.params["slice_sizes"]
    if any(is_tracked(s) for s in starts):
        return _unsupported(eqn, invals, ctx)
    indexed, whole = _lookup_axes(t, sizes)
    if not indexed:  # the whole of W: a view
        return dataclasses.replace(t, w=eqn.primitive.bind(t.w, *starts, **eqn.params))
    if not whole:
        return _unsupported(eqn, invals, ctx, "a slice of every axis, no whole axis")
    if not _lookup_use(t, "dynamic_slice", indexed, whole, ctx):
        return _unsupported(eqn, invals, ctx)
    base = eqn.primitive.bind(t.w, *starts, **eqn.params)
    if ctx.discovering:
        return base
    if ctx.rows is not None:
        raise LoraError(
            f"a mixed-adapter batch needs a lookup into '{t.path}' with the examples on the "
            "leading axis of the ids, but this one reads one slice for the whole batch "
            "(W[i] with a scalar i); look up all examples' ids at once, e.g. under jax.vmap"
        )
    kp = {**eqn.params, "slice_sizes": _kernel_sizes(t, sizes, t.a.shape[-1])}
    mid = eqn.primitive.bind(_as_kernel(t, t.a), *starts, **kp)
    out_pos = {t.w_axes[i]: i for i in whole}
    return _lookup_out(t, base, _to_outputs(mid, t, out_pos, t.b), out_pos)


def _lookup_out(t: Tracked, base, delta, out_pos: dict[int, int]):
    """base + branch of a lookup; under DoRA, both times g along the rows' output axes."""
    if t.g is None:
        return base + delta.astype(base.dtype)
    return dora.rescale(t.g, [out_pos[o] for o in t.layout.outputs], base, delta)


_RULES = {
    "transpose": _transpose,
    "convert_element_type": _convert,
    "sharding_constraint": _on_w_only,
    "copy": _on_w_only,
    "copy_p": _on_w_only,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "dynamic_slice": _dynamic_slice,
    expert_rules.PRIMITIVE: expert_rules.ragged_dot,  # MoE experts
}


def apply_rule(eqn, invals, ctx: Context):
    name = eqn.primitive.name
    if name in HIGHER_ORDER:
        return HIGHER_ORDER[name](eqn, invals, ctx)
    if any(consume.holds_quantized(x) for x in invals):  # dequantised here or followed as a view
        return consume.at_use(eqn, invals, ctx, _dispatch)
    return _dispatch(eqn, invals, ctx)


def _dispatch(eqn, invals, ctx: Context):
    if not any(is_tracked(x) for x in invals):  # a quantised weight without an adapter
        return bind(eqn, invals)
    return _RULES.get(eqn.primitive.name, _unsupported)(eqn, invals, ctx)
