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

from lora_jax.errors import LoraError
from lora_jax.interpreter import HIGHER_ORDER, Context, Tracked, Use, bind, is_tracked

R = "Z"  # einsum label of the rank axis
EX = "Y"  # einsum label of the example axis in a mixed-adapter batch
_LABELS = string.ascii_letters.replace(R, "").replace(EX, "")


# ---------------------------------------------------------------- views of W


def _transpose(eqn, invals, ctx):
    (t,) = invals
    perm = eqn.params["permutation"]
    w = eqn.primitive.bind(t.w, **eqn.params)
    return dataclasses.replace(t, w=w, w_axes=tuple(t.w_axes[i] for i in perm))


def _convert(eqn, invals, ctx):
    (t,) = invals
    dtype = eqn.params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.floating):
        return _unsupported(eqn, invals, ctx)
    w = eqn.primitive.bind(t.w, **eqn.params)
    if ctx.discovering:
        return dataclasses.replace(t, w=w)
    return dataclasses.replace(t, w=w, a=t.a.astype(dtype), b=t.b.astype(dtype))


def _on_w_only(eqn, invals, ctx):
    """Ops that change where or how W is held, not its values (sharding, copies)."""
    (t,) = invals
    return dataclasses.replace(t, w=eqn.primitive.bind(t.w, **eqn.params))


# ---------------------------------------------------------------- materialising fallback


def _delta_view(t: Tracked) -> jax.Array:
    """s·A·B laid out like the current view of W."""
    lab = {o: _LABELS[o] for o in range(len(t.w_axes) + len(t.sliced))}
    a_lab = "".join(lab[o] for o in (*t.stack_left, *t.layout.inputs)) + R
    b_lab = "".join(lab[o] for o in t.stack_left) + R + "".join(lab[o] for o in t.layout.outputs)
    out = "".join(lab[o] for o in t.w_axes)
    return jnp.einsum(f"{a_lab},{b_lab}->{out}", t.a * t.scale, t.b).astype(t.w.dtype)


def _unsupported(eqn, invals, ctx: Context):
    name = eqn.primitive.name
    tracked = [x for x in invals if is_tracked(x)]
    if ctx.discovering:
        ctx.uses.extend(Use(t.path, name, "other") for t in tracked)
        invals = [x.w if is_tracked(x) else x for x in invals]
    elif ctx.allow_materialize and ctx.rows is None:
        invals = [x.w + _delta_view(x) if is_tracked(x) else x for x in invals]
    else:
        raise LoraError(
            f"weight '{tracked[0].path}' reaches '{name}', which LoRA cannot factor; "
            "pass allow_materialize=True to form W+ΔW there"
        )
    return bind(eqn, invals)


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
    base = eqn.primitive.bind(*_with_w(invals), **eqn.params)

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
    return base + delta.astype(base.dtype)


def _check_rows(t: Tracked, x, example_axis_used: bool, ctx: Context) -> None:
    if example_axis_used or x.ndim == 0 or x.shape[0] != ctx.rows.shape[0]:
        raise LoraError(
            f"a mixed-adapter batch needs the {ctx.rows.shape[0]} examples on the leading axis of "
            f"the activations that meet '{t.path}', but they have shape {tuple(x.shape)}"
        )


def _with_w(invals):
    return [x.w if is_tracked(x) else x for x in invals]


def _as_kernel(t: Tracked, a, factor_axes: tuple[int, ...], out_axis: int):
    """A laid out like W's view, with the rank axis standing where W's output axis is."""
    pos = {o: i for i, o in enumerate(factor_axes)}
    perm = [len(factor_axes) if o == out_axis else pos[o] for o in t.w_axes]
    return jnp.transpose(a, perm)


def _contract_rank(mid, axis: int, b, scale: float):
    """Replace `mid`'s rank axis at `axis` by W's output axis through B (scaled)."""
    mid = jnp.moveaxis(mid, axis, -1) * jnp.asarray(scale, mid.dtype)
    out = jnp.einsum("...r,ro->...o", mid, b.astype(mid.dtype))
    return jnp.moveaxis(out, -1, axis)


def _conv(eqn, invals, ctx):
    x, t = invals
    p = eqn.params
    if is_tracked(x) or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return _unsupported(eqn, invals, ctx)
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
    kernel_a = _as_kernel(t, t.a, t.layout.inputs, t.w_axes[out_feat]).astype(t.w.dtype)
    mid = eqn.primitive.bind(_dropout(x, t, ctx), kernel_a, **p)
    return base + _contract_rank(mid, dn.out_spec[1], t.b, t.scale).astype(base.dtype)


def _gather(eqn, invals, ctx):
    t, idx = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if is_tracked(idx) or dn.operand_batching_dims:
        return _unsupported(eqn, invals, ctx)
    indexed = [i for i in range(t.w.ndim) if i in dn.start_index_map or i in dn.collapsed_slice_dims]
    whole = [i for i in range(t.w.ndim) if i not in indexed]
    if any(p["slice_sizes"][i] != t.w.shape[i] for i in whole):
        return _unsupported(eqn, invals, ctx)
    contract = frozenset(t.w_axes[i] for i in indexed)
    free = frozenset(t.w_axes[i] for i in whole)
    if ctx.discovering:
        ctx.uses.append(Use(t.path, "gather", "gather", contract, frozenset(), free, t.sliced))
        return eqn.primitive.bind(t.w, idx, **p)
    if t.stack_left or len(whole) != 1 or contract != frozenset(t.layout.inputs):
        return _unsupported(eqn, invals, ctx)
    base = eqn.primitive.bind(t.w, idx, **p)
    (out_axis,) = whole
    sizes = list(p["slice_sizes"])
    sizes[out_axis] = t.a.shape[-1]
    kept = [i for i in range(t.w.ndim) if i not in dn.collapsed_slice_dims]
    rank_axis = dn.offset_dims[kept.index(out_axis)]
    if ctx.rows is None:
        kernel_a = _as_kernel(t, t.a, t.layout.inputs, t.w_axes[out_axis])
        mid = eqn.primitive.bind(kernel_a, idx, **{**p, "slice_sizes": tuple(sizes)})
        return base + _contract_rank(mid, rank_axis, t.b, t.scale).astype(base.dtype)
    # Mixed batch: the K tables stacked into one [K·V, r] table, indexed by k·V + id.
    if indexed != [0] or idx.shape[0] != ctx.rows.shape[0] or rank_axis == 0:
        return _unsupported(eqn, invals, ctx)
    kernel_a = jax.vmap(lambda a: _as_kernel(t, a, t.layout.inputs, t.w_axes[out_axis]))(t.a)
    flat = kernel_a.reshape(-1, *kernel_a.shape[2:])
    offset = (ctx.rows * t.w.shape[0]).astype(idx.dtype).reshape((-1,) + (1,) * (idx.ndim - 1))
    mid = eqn.primitive.bind(flat, idx + offset, **{**p, "slice_sizes": tuple(sizes)})
    mid = mid * ctx.row_mask.astype(mid.dtype).reshape((-1,) + (1,) * (mid.ndim - 1))
    delta = jax.vmap(lambda m, b: _contract_rank(m, rank_axis - 1, b, t.scale))(mid, t.b[ctx.rows])
    return base + delta.astype(base.dtype)


_RULES = {
    "transpose": _transpose,
    "convert_element_type": _convert,
    "sharding_constraint": _on_w_only,
    "copy": _on_w_only,
    "copy_p": _on_w_only,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
}


def apply_rule(eqn, invals, ctx: Context):
    name = eqn.primitive.name
    if name in HIGHER_ORDER:
        return HIGHER_ORDER[name](eqn, invals, ctx)
    return _RULES.get(name, _unsupported)(eqn, invals, ctx)
