"""`describe`: the dry run before training -- what `init` would build, and what it would refuse.

It traces `fn` abstractly (the same discovery pass and layout function `init` uses), so nothing is
allocated and `params` may be `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(model.init, ...)`)
or hold QuantizedWeights (their dtype cell reads e.g. "nf4->float32").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lora_jax.paths import array_paths, flat_paths
from lora_jax.quant.frozen import standins
from lora_jax.quant.weight import is_quantized
from lora_jax.spec import LoraSpec
from lora_jax.transform import plan


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter: its shape and dtype, and the adapter it would get (None if untargeted)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    targeted: bool
    rank: int | None = None
    a_shape: tuple[int, ...] | None = None
    b_shape: tuple[int, ...] | None = None
    refusal: str | None = None

    @property
    def trainable(self) -> int:
        if self.a_shape is None:
            return 0
        return math.prod(self.a_shape) + math.prod(self.b_shape)


@dataclasses.dataclass(frozen=True)
class Description:
    """Every parameter of `params` as a `Row`; str() is the table."""

    rows: tuple[Row, ...]

    @property
    def base_count(self) -> int:
        return sum(math.prod(r.shape) for r in self.rows)

    @property
    def trainable_count(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def refusals(self) -> dict[str, str]:
        return {r.path: r.refusal for r in self.rows if r.refusal is not None}

    def __str__(self) -> str:
        head = ("path", "shape", "dtype", "lora", "rank", "A", "B", "trainable")
        body = [_cells(r) for r in self.rows]
        widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        out = [line(head), line(["-" * w for w in widths]), *map(line, body)]
        share = self.trainable_count / max(self.base_count, 1)
        out.append(f"trainable {self.trainable_count:,} of base {self.base_count:,} ({share:.2%})")
        out += [f"refused {p}: {why}" for p, why in self.refusals.items()]
        return "\n".join(out)


def _cells(r: Row) -> list[str]:
    shape = lambda s: "x".join(map(str, s)) if s else "scalar"
    if not r.targeted:
        return [r.path, shape(r.shape), r.dtype, "-", "", "", "", ""]
    if r.refusal is not None:
        return [r.path, shape(r.shape), r.dtype, "REFUSED", str(r.rank), "", "", "0"]
    return [r.path, shape(r.shape), r.dtype, "yes", str(r.rank), shape(r.a_shape),
            shape(r.b_shape), f"{r.trainable:,}"]


def describe(fn: Callable, params: Any, *example_args: Any, spec: LoraSpec,
             allow_materialize: bool = False) -> Description:
    """What `lora_jax.init(key, fn, params, *example_args, spec=spec)` would build, per parameter.

    A targeted weight that `init` would refuse (an op LoRA cannot factor, a rank too large)
    gets its reason in `Row.refusal` instead of an error. Bad specs and bad params still raise.
    """
    planned = {p.path: p for p in plan(fn, params, example_args, spec, allow_materialize)}
    kinds = {p: q.kind for p, q in flat_paths(params, is_leaf=is_quantized) if is_quantized(q)}
    rows = []
    for path, w in array_paths(standins(params), abstract=True):
        shape, dtype = tuple(w.shape), np.dtype(w.dtype).name
        if path in kinds:  # a quantised weight: its format, and the dtype it dequantises to
            dtype = f"{kinds[path]}->{dtype}"
        p = planned.get(path)
        if p is None:
            rows.append(Row(path, shape, dtype, False))
        elif p.refusal is not None:
            rows.append(Row(path, shape, dtype, True, p.rank, refusal=p.refusal))
        else:
            rows.append(Row(path, shape, dtype, True, p.rank, p.a_shape, p.b_shape))
    return Description(tuple(rows))
