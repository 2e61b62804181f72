"""`Frozen`: a quantised base weight as the LoRA interpreter carries it through a traced function.

The user's function is traced with a dense stand-in for each `QuantizedWeight`; while the jaxpr is
evaluated, the stand-in's variable holds the quantised value instead. Ops that only look at W a
different way (transposes, reshapes, dtype casts) are recorded, not run; a scan slices the codes
of a stacked weight like any array; only the equation that consumes W (a matmul, a conv, a
lookup) dequantises it and replays the recorded views, so a scanned model holds one layer's
dequantised weights at a time. `lora_jax.quant.consume` decides what happens at each equation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.quant.weight import QuantizedWeight, dequantize, is_quantized

# Ops on W alone that change how it is seen, not its values: recorded, replayed at the consumer.
VIEWS = ("transpose", "convert_element_type", "reshape", "squeeze", "broadcast_in_dim", "slice",
         "rev", "sharding_constraint", "copy", "copy_p")
# The views that are elementwise, so they commute with a scan slicing the layer axis.
_ELEMENTWISE = ("convert_element_type", "copy", "copy_p")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frozen:
    """A quantised weight seen through `views` (equations still to run on its dense value);
    `shape` and `dtype` are those of that view."""

    q: QuantizedWeight
    path: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    views: tuple = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def viewed(self, eqn: Any) -> Frozen:
        """This weight after the view equation `eqn` (recorded; nothing is computed)."""
        aval = eqn.outvars[0].aval
        return dataclasses.replace(self, shape=tuple(aval.shape), dtype=aval.dtype,
                                   views=self.views + (eqn,))

    def dense(self) -> jax.Array:
        """Dequantised to the stand-in's dtype, views replayed. The codes and scales get no
        gradient: the base stays frozen, as in bitsandbytes' training path."""
        w = dequantize(jax.lax.stop_gradient(self.q))
        for eqn in self.views:
            w = eqn.primitive.bind(w, **eqn.primitive.get_bind_params(eqn.params))
        return w


def frozen(q: QuantizedWeight, path: str) -> Frozen:
    return Frozen(q, path, tuple(q.shape), np.dtype(q.dtype))


def is_frozen(x: Any) -> bool:
    return isinstance(x, Frozen)


def standins(params: Any) -> Any:
    """`params` with each QuantizedWeight replaced by the shape and dtype of the weight it holds."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(x.dtype)) if is_quantized(x)
                        else x, params, is_leaf=is_quantized)


def scan_slices(w: Any) -> tuple[Any, Callable[[Any], Any]]:
    """What to hand a scan as xs for `w` (an array or a Frozen) sliced along its first axis, and
    how to rebuild one step's value from the slice."""
    if not is_frozen(w):
        return w, lambda x: x
    q = w.q
    late = [e.primitive.name for e in w.views if e.primitive.name not in _ELEMENTWISE]
    if late:
        raise LoraError(
            f"quantised weight '{w.path}' reaches a scan through '{late[0]}'; a scan may slice a "
            "quantised stack only as it was stored (apply such views inside the scanned body)")
    if not q.stack_axes:
        raise LoraError(
            f"quantised weight '{w.path}' is sliced by a scan along its first axis, but it was "
            "quantised as one block; quantise it with stack_axes=1 (one layer at a time)")

    def step(q_step: QuantizedWeight) -> Frozen:
        q_step = dataclasses.replace(q_step, shape=q.shape[1:], stack_axes=q.stack_axes - 1)
        return dataclasses.replace(w, q=q_step, shape=w.shape[1:])

    return q, step
