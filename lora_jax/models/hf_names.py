"""Hugging Face state-dict keys <-> Flax params paths, for loading, export and PEFT adapters.

The Flax modules mirror HF module names, so the mapping is a renaming:
  "params/model/layers_3/self_attn/q_proj/kernel"  <->  "model.layers.3.self_attn.q_proj.weight"
with Dense kernels stored transposed ([in, out] here, [out, in] in torch). A scanned stack
("params/model/layers/...", leading layer axis) maps to one HF key per layer.
"""

from __future__ import annotations

import re

# The container whose children are the repeated blocks; unindexed when scanned.
_STACK_NAMES = ("layers", "layer")
_INDEXED = re.compile(r"^(layers|layer)_(\d+)$")
_FLAX_TO_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def _strip(path: str) -> list[str]:
    parts = path.split("/")
    return parts[1:] if parts[0] == "params" else parts


def is_stacked(path: str) -> bool:
    """True for a scanned params path: its leading axis indexes layers."""
    return any(p in _STACK_NAMES for p in _strip(path)[:-1])


def unstack_path(path: str, layer: int) -> str:
    """Scanned path -> the equivalent unscanned path of one layer ("layers" -> "layers_3")."""
    parts = path.split("/")
    for i, p in enumerate(parts[:-1]):
        if p in _STACK_NAMES:
            parts[i] = f"{p}_{layer}"
            return "/".join(parts)
    raise ValueError(f"'{path}' is not a scanned layer-stack path")


def flax_to_hf(path: str, layer: int | None = None) -> tuple[str, bool]:
    """Params path -> (HF key, transposed?). Scanned paths need `layer`.

    `transposed` is True for Dense kernels: the HF tensor is kernel.T.
    """
    if is_stacked(path):
        if layer is None:
            raise ValueError(f"'{path}' is a scanned stack; pass the layer index")
        path = unstack_path(path, layer)
    *mods, leaf = _strip(path)
    if leaf not in _FLAX_TO_HF_LEAF:
        raise ValueError(f"'{path}' has no Hugging Face counterpart (leaf '{leaf}')")
    names = []
    for m in mods:
        match = _INDEXED.match(m)
        names.extend([match.group(1), match.group(2)] if match else [m])
    return ".".join([*names, _FLAX_TO_HF_LEAF[leaf]]), leaf == "kernel"


def _weight_leaf(module: str) -> str:
    if module.lower().endswith("norm"):  # input_layernorm, norm, LayerNorm
        return "scale"
    if module == "embed_tokens" or module.endswith("_embeddings"):
        return "embedding"
    return "kernel"


def hf_to_flax(key: str) -> tuple[str, bool]:
    """HF key (family prefixes like "bert." already removed) -> (unscanned path, transposed?).

    A key such as "model.layers.0.self_attn.q_proj" (a PEFT module name, no leaf) is treated as
    naming that module's weight.
    """
    parts = key.split(".")
    if parts[-1] not in ("weight", "bias"):
        parts.append("weight")
    *mods, leaf = parts
    out: list[str] = []
    for m in mods:
        if m.isdigit() and out and out[-1] in _STACK_NAMES:
            out[-1] = f"{out[-1]}_{m}"
        else:
            out.append(m)
    flax_leaf = "bias" if leaf == "bias" else _weight_leaf(out[-1])
    return "/".join(["params", *out, flax_leaf]), flax_leaf == "kernel"


def stack_path(path: str) -> str:
    """Unscanned path -> the scanned path holding the same weight ("layers_3" -> "layers")."""
    parts = path.split("/")
    return "/".join(
        _INDEXED.match(p).group(1) if _INDEXED.match(p) else p for p in parts
    )


def layer_index(path: str) -> int | None:
    """The layer number in an unscanned path, or None outside the layer stack."""
    for p in path.split("/"):
        match = _INDEXED.match(p)
        if match:
            return int(match.group(2))
    return None
