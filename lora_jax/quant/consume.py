"""What the LoRA interpreter does at an equation that touches a quantised base weight.

A view of W alone is recorded (`Frozen.viewed`). A consumer (matmul, conv, lookup) dequantises
W to the stand-in's dtype right there and runs the ordinary rule on the dense value:
y = x·deq(Wq) + s·(x·A)·B for an adapted weight, y = x·deq(Wq) for an untargeted one. The
consumer runs under `jax.checkpoint`, so the backward pass dequantises W again instead of
keeping it (bitsandbytes' MatMul4Bit does the same): gradients of a scanned model keep the codes
per layer, never the dense stack. Anything else that reaches a quantised weight is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.interpreter import Context, is_tracked
from lora_jax.quant.frozen import VIEWS, is_frozen

CONSUMERS = ("dot_general", "conv_general_dilated", "gather", "dynamic_slice")
# Views the LoRA rules follow on an adapted weight (the others dequantise it first).
_TRACKED_VIEWS = ("transpose", "convert_element_type", "sharding_constraint", "copy", "copy_p")


def holds_quantized(x: Any) -> bool:
    return is_frozen(x) or (is_tracked(x) and is_frozen(x.w))


def densify(x: Any) -> Any:
    """x with its quantised weight (bare, or the W of a Tracked) dequantised."""
    if is_frozen(x):
        return x.dense()
    if is_tracked(x) and is_frozen(x.w):
        return dataclasses.replace(x, w=x.w.dense())
    return x


def cannot_dequantize(path: str, prim: str) -> str:
    return (f"quantised weight '{path}' reaches '{prim}', where it cannot be dequantised; a "
            f"quantised base is dequantised only where it is consumed ({', '.join(CONSUMERS)}) "
            f"and followed through views ({', '.join(VIEWS)}); leave '{path}' out of "
            "quantize_params' targets to keep it dense")


def at_use(eqn: Any, invals: Sequence[Any], ctx: Context,
           rule: Callable[[Any, Sequence[Any], Context], Any]) -> Any:
    """Record a view, or dequantise at a consumer and run `rule` (the ordinary dispatch) there."""
    name = eqn.primitive.name
    held = next(x for x in invals if holds_quantized(x))
    path = held.path
    viewable = name in VIEWS and len(invals) == 1
    if name == "convert_element_type" and not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        viewable = False
    if not viewable and name not in CONSUMERS:
        raise LoraError(cannot_dequantize(path, name))
    if viewable and is_frozen(held):
        return held.viewed(eqn)
    if viewable and name in _TRACKED_VIEWS:
        return rule(eqn, invals, ctx)  # the rule moves W (still quantised) and A, B together
    consume = jax.checkpoint(lambda vals: rule(eqn, [densify(x) for x in vals], ctx))
    return consume(list(invals))


def view_w(eqn: Any, w: Any) -> Any:
    """`eqn` (a view of W alone) applied to W: recorded when W is quantised."""
    if is_frozen(w):
        return w.viewed(eqn)
    return eqn.primitive.bind(w, **eqn.params)

