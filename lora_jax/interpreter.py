"""Evaluate a jaxpr with targeted weights carried as `Tracked` (W plus its factors A, B).

Ordinary equations are re-bound as they are. An equation that touches a `Tracked` value goes to a
rule (`lora_jax.rules`): views (transpose, dtype casts, sharding constraints) move W and the
factors together; consumers (dot_general, conv, gather) add the factored low-rank branch;
higher-order primitives (jit, scan, while, cond, remat, custom_jvp/vjp) are evaluated again with
this interpreter inside, so stacked adapters are sliced by the same scan that slices the weights.
A weight such a primitive hands back unchanged (`nnx.remat` returns the module's weights, a scan
carries a loop-invariant one) comes out as the same `Tracked`; only a changed one is refused.

A quantised base weight is carried as a `Frozen` (lora_jax.quant.frozen): followed through
views and scans like a `Tracked`, dequantised only at the equation that consumes it.

The same interpreter runs in discovery mode (`Context.uses` is a list, A and B are None): then
consumers only record how each weight is contracted, which is how `init` picks adapter shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.quant.frozen import is_frozen, scan_slices


@dataclasses.dataclass(frozen=True)
class Layout:
    """W's axes grouped as in `Adapter` (stack, inputs, outputs), all in W's original numbering."""

    stack: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tracked:
    """A view of a targeted weight: W as seen here, and the matching views of A and B.

    w_axes[i] is the original W axis that view axis i of `w` is; `sliced` lists original axes a
    scan has already sliced away (A and B lose them too, so a's axes are the remaining stack axes,
    then inputs, then r).
    """

    w: Any
    a: Any
    b: Any
    path: str = dataclasses.field(metadata=dict(static=True))
    w_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    sliced: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    layout: Layout | None = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    g: Any = None  # DoRA's m/‖W + ΔW‖ [*stack_left, *outputs] (lora_jax/variants/dora.py), or None

    @property
    def stack_left(self) -> tuple[int, ...]:
        return tuple(s for s in self.layout.stack if s not in self.sliced)


@dataclasses.dataclass(frozen=True)
class Use:
    """How discovery saw a weight used: the original axes contracted, batched and left free."""

    path: str
    prim: str
    kind: str  # "dot" | "conv" | "gather" (any indexed lookup) | "other" | "changed"
    contract: frozenset = frozenset()
    batch: frozenset = frozenset()
    free: frozenset = frozenset()
    sliced: tuple[int, ...] = ()
    note: str = ""  # why a use of kind "other" or "changed" cannot be factored


@dataclasses.dataclass
class Context:
    """Per-call settings; `uses` is a list in discovery mode and None when applying."""

    allow_materialize: bool = False
    rng: jax.Array | None = None  # set only when dropout is active
    rows: jax.Array | None = None  # mixed batch: each example's adapter (index into the stack)
    row_mask: jax.Array | None = None  # mixed batch: 0 for examples without an adapter
    uses: list[Use] | None = None
    sites: int = 0

    @property
    def discovering(self) -> bool:
        return self.uses is not None

    def next_key(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.sites += 1
        return jax.random.fold_in(self.rng, self.sites)

    def child(self, rng: jax.Array | None = None) -> Context:
        return dataclasses.replace(self, rng=self.rng if rng is None else rng, sites=0)


def is_tracked(x: Any) -> bool:
    return isinstance(x, Tracked)


def is_carried(x: Any) -> bool:
    """A value the interpreter follows: an adapted weight, or a quantised one (`Frozen`)."""
    return isinstance(x, Tracked) or is_frozen(x)


def eval_jaxpr(jaxpr: jex.core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: Context):
    """Evaluate `jaxpr` where some inputs may be `Tracked`; returns the list of outputs."""
    from lora_jax import rules

    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if any(is_carried(x) for x in invals):
                outs = rules.apply_rule(eqn, invals, ctx)
            else:
                outs = bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jex.core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def bind(eqn: jex.core.JaxprEqn, invals: Sequence[Any]) -> Any:
    """Re-bind an equation as written (what jax's own evaluator does)."""
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def eval_closed(closed: jex.core.ClosedJaxpr, args: Sequence[Any], ctx: Context):
    return eval_jaxpr(closed.jaxpr, closed.consts, args, ctx)


def untrack_changed(values: Sequence[Any], prim: str, ctx: Context, what: str) -> list[Any]:
    """Refuse tracked weights that a higher-order primitive changes and hands on (a loop carry
    that is not loop-invariant, a result computed from W); discovery records them instead, so
    `init` and `describe` can name the weight and the reason."""
    out = []
    for x in values:
        if is_frozen(x):
            raise LoraError(changed_message(x.path, prim, what))
        if is_tracked(x):
            if not ctx.discovering:
                raise LoraError(changed_message(x.path, prim, what))
            ctx.uses.append(Use(x.path, prim, "changed", note=what))
            x = x.w.dense() if is_frozen(x.w) else x.w
        out.append(x)
    return out


def changed_message(path: str, prim: str, what: str) -> str:
    return (f"weight '{path}' leaves '{prim}' as {what} that '{prim}' changes; LoRA follows a "
            f"weight into '{prim}' and through it unchanged, not one it computes")


# Primitives that call one body as it is, and the parameter that holds it: inlined when a
# tracked weight goes in (HIGHER_ORDER below), followed by `_forwards` for weights passed through.
_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
            "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
            "custom_vjp_call_jaxpr": "fun_jaxpr"}
_CALLS = {**_INLINED, "remat2": "jaxpr", "checkpoint": "jaxpr"}


def _forwards(jaxpr: jex.core.Jaxpr) -> dict[int, int]:
    """{output position: input position} for outputs that are an input unchanged, also when it
    went through nested calls on the way (a scan body returning what an inner remat returned)."""
    alias = {v: i for i, v in enumerate(jaxpr.invars)}
    for eqn in jaxpr.eqns:
        inner = eqn.params.get(_CALLS.get(eqn.primitive.name, ""))
        inner = getattr(inner, "jaxpr", inner)
        if inner is None or len(inner.invars) != len(eqn.invars):
            continue
        for o, i in _forwards(inner).items():
            v = eqn.invars[i]
            if not isinstance(v, jex.core.Literal) and v in alias:
                alias[eqn.outvars[o]] = alias[v]
    return {o: alias[v] for o, v in enumerate(jaxpr.outvars)
            if not isinstance(v, jex.core.Literal) and v in alias}


def passed_through(jaxpr: jex.core.Jaxpr, invals: Sequence[Any], offset: int = 0) -> dict[int, int]:
    """{output position: input position} for outputs that are a tracked input unchanged.

    `offset` is where `invals` start among `jaxpr`'s inputs (a scan's consts and carry, a cond's
    operands after the branch index).
    """
    found = {}
    for o, i in _forwards(jaxpr).items():
        if 0 <= i - offset < len(invals) and is_carried(invals[i - offset]):
            found[o] = i - offset
    return found


def _fill(outs: Sequence[Any], passed: dict[int, int], invals: Sequence[Any]) -> list[Any]:
    return [invals[passed[o]] if o in passed else x for o, x in enumerate(outs)]


def _blank(outs: Sequence[Any], passed: dict[int, int]) -> list[Any]:
    return [None if o in passed else x for o, x in enumerate(outs)]


# ---------------------------------------------------------------- higher-order primitives


def inline_rule(jaxpr_param: str) -> Callable:
    """jit / custom_jvp / custom_vjp with a targeted weight inside: evaluate the body inline.

    Inlining drops a custom derivative rule; the derivative then comes from the body itself,
    which is what differentiating the factored form needs.
    """

    def rule(eqn, invals, ctx):
        closed = eqn.params[jaxpr_param]
        consts = closed.consts if hasattr(closed, "consts") else ()
        jaxpr = closed.jaxpr if hasattr(closed, "consts") else closed
        return eval_jaxpr(jaxpr, consts, invals, ctx)

    return rule


def remat_rule(eqn, invals, ctx):
    """Weights the body returns unchanged (`nnx.remat` returns the module's) come out as they
    went in; a view computed inside leaves as a `Tracked` pytree."""
    jaxpr = eqn.params["jaxpr"]
    passed = passed_through(jaxpr, invals)

    def body(*args):
        return _blank(eval_jaxpr(jaxpr, (), args, ctx), passed)

    fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return _fill(fn(*invals), passed, invals)


def _slice_leading(t: Tracked, ctx: Context) -> tuple[tuple, Callable[[tuple], Tracked]]:
    """Arrays to hand a scan as xs for `t`, and how to rebuild the per-step view inside the body."""
    orig = t.w_axes[0]
    sliced = t.sliced + (orig,)
    rest = dataclasses.replace(t, w=None, a=None, b=None, g=None, w_axes=t.w_axes[1:], sliced=sliced)
    w_xs, w_step = scan_slices(t.w)  # a quantised stack: its codes, one layer a step
    if ctx.discovering:
        return (w_xs,), lambda xs: dataclasses.replace(rest, w=w_step(xs[0]))
    if orig not in t.stack_left:
        raise LoraError(
            f"weight '{t.path}' is sliced by a scan along axis {orig}, but its adapter is not "
            "stacked on that axis; re-create the adapter with lora_jax.init on this function"
        )
    i = t.stack_left.index(orig) + (ctx.rows is not None)  # after a mixed batch's adapter axis
    a, b = jnp.moveaxis(t.a, i, 0), jnp.moveaxis(t.b, i, 0)
    if t.g is not None:  # DoRA's factor is sliced with the stack like A and B
        g = jnp.moveaxis(t.g, t.stack_left.index(orig), 0)
        return (w_xs, a, b, g), lambda xs: dataclasses.replace(
            rest, w=w_step(xs[0]), a=xs[1], b=xs[2], g=xs[3])
    return (w_xs, a, b), lambda xs: dataclasses.replace(rest, w=w_step(xs[0]), a=xs[1], b=xs[2])


def _scan_counts(p: dict) -> tuple[int, int]:
    """(consts, carry) counts: JAX <= 0.10 names them; newer JAX groups the inputs in `ft_in`."""
    if "num_consts" in p:
        return p["num_consts"], p["num_carry"]
    consts, carry, _ = p["ft_in"].unpack()
    return len(consts), len(carry)


def _invariant_carry(jaxpr: jex.core.Jaxpr, carry: Sequence[Any], first: int) -> set[int]:
    """Tracked carries the loop body hands back unchanged: loop-invariant, so held as consts."""
    passed = passed_through(jaxpr, carry, first)
    return {o for o, i in passed.items() if o == i}


def _split_carry(carry: Sequence[Any], held: set[int]) -> list[Any]:
    return [c for i, c in enumerate(carry) if i not in held]


def _join_carry(carry: Sequence[Any], held: set[int], looped: Sequence[Any]) -> list[Any]:
    it = iter(looped)
    return [carry[i] if i in held else next(it) for i in range(len(carry))]


def scan_rule(eqn, invals, ctx):
    p = eqn.params
    n_consts, n_carry = _scan_counts(p)
    consts, carry, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    body_jaxpr = p["jaxpr"].jaxpr
    held = _invariant_carry(body_jaxpr, carry, n_consts)
    looped = untrack_changed(_split_carry(carry, held), "scan", ctx, "a loop carry")
    ys_passed = {o - n_carry: i for o, i in
                 passed_through(body_jaxpr, xs, n_consts + n_carry).items() if o >= n_carry}
    xs_arrays, rebuilds = [], []
    for x in xs:
        if is_tracked(x):
            arrays, rebuild = _slice_leading(x, ctx)
        else:
            x_xs, step = scan_slices(x)
            arrays, rebuild = (x_xs,), lambda t, step=step: step(t[0])
        xs_arrays.append(arrays)
        rebuilds.append(rebuild)
    key = ctx.next_key()
    keys = None if key is None else jax.random.split(key, p["length"])

    def body(carry_in, step):
        step_xs, key = step
        step_xs = [rb(x) for rb, x in zip(rebuilds, step_xs, strict=True)]
        args = [*consts, *_join_carry(carry, held, carry_in), *step_xs]
        outs = eval_closed(p["jaxpr"], args, ctx.child(key))
        carry_out = untrack_changed(_split_carry(outs[:n_carry], held), "scan", ctx, "a loop carry")
        ys = untrack_changed(_blank(outs[n_carry:], ys_passed), "scan", ctx, "a result")
        return carry_out, ys

    carry_out, ys = jax.lax.scan(
        body, looped, (xs_arrays, keys), length=p["length"],
        reverse=p["reverse"], unroll=p["unroll"],
    )
    return [*_join_carry(carry, held, carry_out), *_fill(ys, ys_passed, xs)]


def while_rule(eqn, invals, ctx):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    held = _invariant_carry(p["body_jaxpr"].jaxpr, carry, nb)
    looped = untrack_changed(_split_carry(carry, held), "while", ctx, "a loop carry")

    def cond_fn(c):
        args = [*cond_consts, *_join_carry(carry, held, c)]
        return eval_closed(p["cond_jaxpr"], args, ctx.child())[0]

    def body_fn(c):
        outs = eval_closed(p["body_jaxpr"], [*body_consts, *_join_carry(carry, held, c)], ctx.child())
        return untrack_changed(_split_carry(outs, held), "while", ctx, "a loop carry")

    return _join_carry(carry, held, jax.lax.while_loop(cond_fn, body_fn, looped))


def cond_rule(eqn, invals, ctx):
    """An operand every branch returns unchanged comes out as it went in."""
    index, *ops = invals
    branches = eqn.params["branches"]
    each = [passed_through(b.jaxpr, ops) for b in branches]
    passed = {o: i for o, i in each[0].items() if all(e.get(o) == i for e in each)}

    def branch(closed):
        def fn(*args):
            outs = _blank(eval_closed(closed, args, ctx.child()), passed)
            return untrack_changed(outs, "cond", ctx, "a result")

        return fn

    outs = jax.lax.switch(index, [branch(b) for b in branches], *ops)
    return _fill(outs, passed, ops)


HIGHER_ORDER: dict[str, Callable] = {
    **{name: inline_rule(param) for name, param in _INLINED.items()},
    "remat2": remat_rule,
    "checkpoint": remat_rule,
    "scan": scan_rule,
    "while": while_rule,
    "cond": cond_rule,
}
