"""bitsandbytes' serialised weights -> QuantizedWeight, refusing any layout not understood.

Two layouts, as transformers' save_pretrained writes them for an nn.Linear `M` whose weight is
stored under `M.weight` ([out, in] in PyTorch; the Flax kernel is its transpose):
- 4-bit (`*-bnb-4bit`, Linear4bit): `M.weight` packed uint8 [(n+1)//2, 1], `M.weight.absmax`,
  `M.weight.quant_map` (the 16 code values), with double quantisation `M.weight.nested_absmax`
  and `M.weight.nested_quant_map` (the dynamic 8-bit map), and
  `M.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a uint8 tensor of JSON with
  quant_type, blocksize, dtype, shape and, when nested, nested_blocksize, nested_dtype,
  nested_offset.
- LLM.int8 (Linear8bitLt): `M.weight` int8 [out, in], `M.SCB` float32 [out] and
  `M.weight_format` (0: row-major, the only format written on save).
Every key, dtype, shape, JSON field and code table is checked; anything else is a LoraError
naming the tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.quant import blockwise, codes
from lora_jax.quant.weight import BLOCKSIZES, DTYPES, QuantizedWeight

QUANT_STATE = "quant_state.bitsandbytes__"
FOUR_BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INT8_PARTS = ("SCB", "weight_format")
_STATE_FIELDS = {"quant_type", "blocksize", "dtype", "shape"}
_NESTED_FIELDS = {"nested_blocksize", "nested_dtype", "nested_offset"}


def layout_index(keys: Any) -> dict[str, dict[str, str]]:
    """Checkpoint keys grouped by the weight whose layout they belong to: {"M.weight": {part:
    key}} with parts "absmax", "quant_state.bitsandbytes__nf4", ... (4-bit) or "SCB",
    "weight_format" (int8). Dense weights have no entry."""
    index: dict[str, dict[str, str]] = {}
    for key in keys:
        base, sep, part = key.partition(".weight.")
        if sep:
            index.setdefault(base + ".weight", {})[part] = key
            continue
        module, _, part = key.rpartition(".")
        if part in INT8_PARTS:
            index.setdefault(module + ".weight", {})[part] = key
    return index


def stored_kind(weight_key: str, parts: Mapping[str, str]) -> str | None:
    """"nf4" / "fp4" / "int8" for a weight stored quantised, None for a dense one."""
    if not parts:
        return None
    if any(p in parts for p in INT8_PARTS):
        four_bit = sorted(k for p, k in parts.items() if p not in INT8_PARTS)
        if four_bit:
            raise LoraError(f"tensor '{four_bit[0]}' mixes the 4-bit layout into the LLM.int8 one "
                            f"of '{weight_key}'")
        return "int8"
    states = sorted(p for p in parts if p.startswith("quant_state."))
    if len(states) != 1:
        found = ", ".join(parts[p] for p in states) if states else "none"
        raise LoraError(f"weight '{weight_key}' has bitsandbytes parts but needs exactly one "
                        f"'{weight_key}.{QUANT_STATE}nf4' or '...__fp4' (found {found})")
    kind = states[0][len(QUANT_STATE):] if states[0].startswith(QUANT_STATE) else None
    if kind not in ("nf4", "fp4"):
        raise LoraError(f"tensor '{parts[states[0]]}' is not a bitsandbytes 4-bit quant state "
                        f"(expected '{weight_key}.{QUANT_STATE}nf4' or '...__fp4')")
    for part, key in sorted(parts.items()):
        if part not in FOUR_BIT_PARTS and part != states[0]:
            raise LoraError(f"tensor '{key}' is not part of bitsandbytes' 4-bit layout "
                            f"(expected {weight_key}.{{{', '.join(FOUR_BIT_PARTS)}}})")
    return kind


def read_bnb(
    weight_key: str,
    parts: Mapping[str, str],
    read: Callable[[str], np.ndarray],
    shape_oi: tuple[int, ...],
    dtype: str | None,
) -> QuantizedWeight:
    """The stored quantised weight of a PyTorch [out, in] Linear as the QuantizedWeight of its
    Flax [in, out] kernel (transpose=True). `dtype`: what dequantize returns (None: the dtype
    the quant state records; LLM.int8 records none, so it must be given)."""
    kind = stored_kind(weight_key, parts)
    if kind == "int8":
        return _read_int8(weight_key, parts, read, shape_oi, dtype)
    state_key = parts[QUANT_STATE + kind]
    state = _quant_state(state_key, read(state_key), kind, shape_oi)
    nested = "nested_offset" in state
    n, blocksize = math.prod(shape_oi), state["blocksize"]
    blocks = -(-n // blocksize)
    for part in ("absmax", "quant_map", *(("nested_absmax", "nested_quant_map") if nested else ())):
        if part not in parts:
            raise LoraError(f"weight '{weight_key}' has no tensor '{weight_key}.{part}' "
                            f"(its quant state {state_key} asks for it)")
    if not nested and ("nested_absmax" in parts or "nested_quant_map" in parts):
        extra = parts.get("nested_absmax") or parts["nested_quant_map"]
        raise LoraError(f"tensor '{extra}' is present but quant state {state_key} has no nested_offset")
    packed = _array(weight_key, read(weight_key), np.uint8, ((n + 1) // 2, 1))
    absmax = _array(parts["absmax"], read(parts["absmax"]), np.uint8 if nested else np.float32, (blocks,))
    _same_table(parts["quant_map"], read(parts["quant_map"]), codes.TABLES_4BIT[kind], f"{kind} code table")
    nested_absmax = offset = None
    if nested:
        nested_absmax = jnp.asarray(_array(parts["nested_absmax"], read(parts["nested_absmax"]),
                                           np.float32, (-(-blocks // blockwise.NESTED_BLOCKSIZE),)))
        _same_table(parts["nested_quant_map"], read(parts["nested_quant_map"]), codes.dynamic_map(),
                    "dynamic 8-bit map")
        offset = jnp.asarray(np.float32(state["nested_offset"]))
    return QuantizedWeight(jnp.asarray(packed.reshape(-1)), jnp.asarray(absmax), nested_absmax, offset,
                           tuple(reversed(shape_oi)), dtype or state["dtype"], kind, blocksize, True)


def _read_int8(weight_key: str, parts: Mapping[str, str], read: Callable[[str], np.ndarray],
               shape_oi: tuple[int, ...], dtype: str | None) -> QuantizedWeight:
    if "SCB" not in parts:
        raise LoraError(f"weight '{weight_key}' has '{parts['weight_format']}' but no "
                        f"'{parts['weight_format'][: -len('weight_format')]}SCB'")
    if "weight_format" in parts:
        fmt = read(parts["weight_format"])
        if fmt.shape != () or int(fmt) != 0:
            raise LoraError(f"tensor '{parts['weight_format']}' is {fmt.tolist()}; expected 0 "
                            "(row-major, the format bitsandbytes saves)")
    if dtype is None:
        raise LoraError(f"weight '{weight_key}' is stored in LLM.int8, which records no dtype; pass one")
    q = _array(weight_key, read(weight_key), np.int8, shape_oi)
    scb = _array(parts["SCB"], read(parts["SCB"]), np.float32, shape_oi[:1])
    return QuantizedWeight(jnp.asarray(q), jnp.asarray(scb), None, None, tuple(reversed(shape_oi)),
                           dtype, "int8", None, True)


def _quant_state(key: str, raw: np.ndarray, kind: str, shape_oi: tuple[int, ...]) -> dict[str, Any]:
    """The JSON a 4-bit quant-state tensor holds, every field checked."""
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError
        state = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError
    except ValueError:
        raise LoraError(f"tensor '{key}' does not hold bitsandbytes' quant-state JSON "
                        f"(a 1-D uint8 tensor of a JSON object)") from None
    nested = "nested_offset" in state
    want = _STATE_FIELDS | (_NESTED_FIELDS if nested else set())
    if set(state) != want:
        odd = sorted(set(state) ^ want)
        raise LoraError(f"tensor '{key}': quant-state fields {sorted(state)}; expected "
                        f"{sorted(want)} (differs in {odd})")
    checks = [("quant_type", state["quant_type"] == kind, repr(kind)),
              ("blocksize", state["blocksize"] in BLOCKSIZES, f"one of {BLOCKSIZES}"),
              ("dtype", state["dtype"] in DTYPES, f"one of {DTYPES}"),
              ("shape", state["shape"] == list(shape_oi), f"{list(shape_oi)} (config.json's, as [out, in])")]
    if nested:
        checks += [("nested_blocksize", state["nested_blocksize"] == blockwise.NESTED_BLOCKSIZE,
                    str(blockwise.NESTED_BLOCKSIZE)),
                   ("nested_dtype", state["nested_dtype"] == "float32", "'float32'"),
                   ("nested_offset", isinstance(state["nested_offset"], float), "a float")]
    for field, ok, expected in checks:
        if not ok:
            raise LoraError(f"tensor '{key}': {field} is {state[field]!r}; expected {expected}")
    return state


def _array(key: str, x: np.ndarray, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    if x.dtype != dtype or tuple(x.shape) != tuple(shape):
        raise LoraError(f"tensor '{key}' is {x.dtype.name} {tuple(x.shape)}; expected "
                        f"{np.dtype(dtype).name} {tuple(shape)}")
    return x


def _same_table(key: str, x: np.ndarray, table: np.ndarray, what: str) -> None:
    """A stored code table must be bitsandbytes' own (values equal; FP4's zero may be +0)."""
    _array(key, x, np.float32, table.shape)
    if not np.array_equal(x, table):
        raise LoraError(f"tensor '{key}' is not bitsandbytes' {what}; custom code tables are not supported")
