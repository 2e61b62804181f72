"""The rule for `ragged_dot` (grouped matmul) on a targeted MoE expert weight.

ragged_dot(x [M, in], W [E, in, out], group_sizes [E]) multiplies each contiguous run of rows of
x by its group's (expert's) matrix. The expert axis is a stack axis of the adapter, so
A [E, in, r] and B [E, r, out], and the branch is two ragged_dots over the same groups:
    y = ragged_dot(x, W) + s·ragged_dot(ragged_dot(x, A), B)
Each token meets only its expert's factors; W + ΔW is never formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.interpreter import Context, Use, bind, is_tracked

PRIMITIVE = "ragged_dot_general"


def _plain_groups(dn) -> bool:
    """The MoE form: rows of x grouped (ragged on a free axis of x), W grouped on one axis."""
    (lc, _), (lb, rb) = dn.dot_dimension_numbers
    return (not lb and not rb and len(dn.lhs_ragged_dimensions) == 1
            and dn.lhs_ragged_dimensions[0] not in lc and len(dn.rhs_group_dimensions) == 1)


def ragged_dot(eqn, invals, ctx: Context):
    from lora_jax import rules  # rules registers this rule; imported here to avoid a cycle

    x, t, group_sizes, *rest = invals
    p = eqn.params
    dn = p["ragged_dot_dimension_numbers"]
    if is_tracked(x) or is_tracked(group_sizes) or rest or p.get("group_offset") is not None:
        return rules._unsupported(eqn, invals, ctx)
    if not _plain_groups(dn):
        return rules._unsupported(eqn, invals, ctx, "a ragged_dot that does not group rows of "
                                  "the activations by one axis of the weight")
    (lc, rc), _ = dn.dot_dimension_numbers
    (g,) = dn.rhs_group_dimensions
    group = t.w_axes[g]
    contract = frozenset(t.w_axes[i] for i in rc)
    if ctx.discovering:
        free = frozenset(t.w_axes) - contract - {group}
        ctx.uses.append(Use(t.path, PRIMITIVE, "dot", contract, frozenset([group]), free, t.sliced))
        return bind(eqn, [x, t.w, group_sizes])
    if ctx.rows is not None:
        raise LoraError(
            f"a mixed-adapter batch (adapter_index) cannot reach the expert weight '{t.path}': "
            "ragged_dot groups tokens by expert, not by example; adapt only attention, router "
            "and dense weights for mixed batches, or run one adapter per batch"
        )
    if getattr(t, "g", None) is not None:
        raise LoraError(f"DoRA on the expert weight '{t.path}' is not supported; use plain LoRA there")
    lay = t.layout
    if t.stack_left != (group,) or contract != frozenset(lay.inputs):
        if ctx.allow_materialize:
            return rules._unsupported(eqn, invals, ctx)
        raise LoraError(
            f"adapter for '{t.path}' is stacked on axes {list(t.stack_left)} and factors axes "
            f"{list(lay.inputs)}, but ragged_dot groups W on axis {group} and contracts "
            f"{sorted(contract)}; create the adapter with lora_jax.init on this function"
        )
    base = bind(eqn, [x, t.w, group_sizes])
    # A [E, *inputs, r]: x's contracted axes meet A's input axes; the rank is A's last axis.
    a_contract = tuple(1 + lay.inputs.index(t.w_axes[i]) for i in rc)
    x_free = [i for i in range(x.ndim) if i not in lc]
    ragged = x_free.index(dn.lhs_ragged_dimensions[0])
    dn_a = jax.lax.RaggedDotDimensionNumbers(((tuple(lc), a_contract), ((), ())),
                                             dn.lhs_ragged_dimensions, (0,))
    x_in = rules._dropout(x, t, ctx)
    a = t.a.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else t.a
    prec, pref = p.get("precision"), p.get("preferred_element_type")
    mid = jax.lax.ragged_dot_general(x_in, a, group_sizes, dn_a, precision=prec,
                                     preferred_element_type=pref)
    mid = mid * jnp.asarray(t.scale, mid.dtype)
    dn_b = jax.lax.RaggedDotDimensionNumbers((((mid.ndim - 1,), (1,)), ((), ())), (ragged,), (0,))
    delta = jax.lax.ragged_dot_general(mid, t.b.astype(mid.dtype), group_sizes, dn_b,
                                       precision=prec, preferred_element_type=pref)
    # delta's W axes are in original order; base has them in the view's order.
    view_out = [t.w_axes[i] for i in range(len(t.w_axes)) if i not in rc and i != g]
    n_x = len(x_free)
    perm = list(range(n_x)) + [n_x + sorted(view_out).index(o) for o in view_out]
    return base + jnp.transpose(delta, perm).astype(base.dtype)
