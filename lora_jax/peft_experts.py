"""PEFT's `target_parameters` adapters on MoE expert weights (and routers), both ways.

PEFT wraps a 3-D expert parameter (torch [E, out, in], as transformers 5 holds
experts.gate_up_proj / experts.down_proj) in a ParamWrapper whose factors are flat across
experts: lora_A.weight [r·E, in] (expert e's rows e·r .. e·r+r-1) and lora_B.weight [out, r·E]
(expert e's columns e, E+e, 2E+e, ...: the rank index is the slower one). ΔW[e] = s·B_e·A_e.
Ours are A [E, in, r], B [E, r, out]. Two parameters of one module nest: the first in the
module's order (gate_up_proj) is saved under `experts.base_layer.`, the other under `experts.`.
A router is a 2-D parameter (mlp.gate.weight): PEFT's factors are a Linear's, but it must be
named in target_parameters, not target_modules.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import Adapter, adapter_items
from lora_jax.errors import LoraError
from lora_jax.models.hf_names import is_stacked, stack_path
from lora_jax.models.moe_checkpoint import EXPERT_PARAMS, expert_module, is_expert_path
from lora_jax.paths import flat_paths, nest

PREFIX = "base_model.model."
_KEY = re.compile(rf"{re.escape(PREFIX)}(.+\.experts)((?:\.base_layer)*)\.lora_(A|B)\.weight")
_ROUTER = re.compile(r".*\.mlp\.gate$")


def split(adapters: Any) -> tuple[Any, dict[str, Adapter]]:
    """(the other adapters, {path: Adapter} of expert weights)."""
    rest, experts = {}, {}
    for path, ad in adapter_items(adapters):
        (experts if is_expert_path(path) else rest)[path] = ad
    return nest(rest), experts


def _to_peft(a_ExIxR: np.ndarray, b_ExRxO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    E, n_in, r = a_ExIxR.shape
    lora_a = a_ExIxR.transpose(0, 2, 1).reshape(E * r, n_in)
    lora_b = b_ExRxO.transpose(2, 1, 0).reshape(b_ExRxO.shape[2], r * E)
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def _from_peft(lora_a: np.ndarray, lora_b: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    r = lora_a.shape[0] // experts
    a = lora_a.reshape(experts, r, lora_a.shape[1]).transpose(0, 2, 1)
    b = lora_b.reshape(lora_b.shape[0], r, experts).transpose(2, 1, 0)
    return a.astype(np.float32), b.astype(np.float32)


def save_tensors(experts: dict[str, Adapter], rslora: bool) -> tuple[dict, dict, dict]:
    """(tensors, ranks, alphas) of the expert adapters, keyed as `peft.save_adapter` keys them."""
    tensors, ranks, alphas = {}, {}, {}
    targeted = collections.defaultdict(set)  # HF module -> its targeted parameters
    items = []
    for path, ad in experts.items():
        if ad.is_dora if hasattr(ad, "is_dora") else False:
            raise LoraError(f"adapter '{path}' is DoRA; PEFT's target_parameters take plain LoRA only")
        a, b = np.asarray(ad.a, np.float32), np.asarray(ad.b, np.float32)
        layers = [(None, a, b)] if len(ad.stack) == 1 else [(i, a[i], b[i]) for i in range(a.shape[0])]
        for layer, a_l, b_l in layers:
            module, param = expert_module(path, layer)
            targeted[module].add(param)
            items.append((module, param, a_l, b_l, ad.scale))
    for module, param, a_l, b_l, scale in items:
        params = [p for p in EXPERT_PARAMS if p in targeted[module]]
        nesting = ".base_layer" * (len(params) - 1 - params.index(param))
        lora_a, lora_b = _to_peft(a_l, b_l)
        tensors[f"{PREFIX}{module}{nesting}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{module}{nesting}.lora_B.weight"] = lora_b
        r = a_l.shape[-1]
        ranks[f"{module}.{param}"], alphas[f"{module}.{param}"] = r, scale * (math.sqrt(r) if rslora else r)
    return tensors, ranks, alphas


def place_targets(config: dict, family_is_moe: bool) -> None:
    """Move expert weights (and routers) from target_modules to target_parameters; their rank and
    alpha must be the adapter's common ones (PEFT's patterns name modules, not parameters)."""
    if not family_is_moe:  # a dense model's down_proj / gate are ordinary modules
        return
    params = {n for n in config["target_modules"] if n in EXPERT_PARAMS}
    if "gate" in config["target_modules"]:
        params.add("gate")
    if not params:
        return
    names = {"gate": "mlp.gate.weight", **{p: f"mlp.experts.{p}" for p in EXPERT_PARAMS}}
    for kind in ("rank_pattern", "alpha_pattern"):
        for key in config[kind]:
            if key.rstrip("$").endswith(tuple(f".{p}" for p in params)) or _ROUTER.match(key.strip("^$")):
                raise LoraError(f"'{key.strip('^$')}' has its own {kind.split('_')[0]}; PEFT's "
                                "target_parameters need the adapter's common rank and alpha")
    config["target_modules"] = sorted(set(config["target_modules"]) - params)
    config["target_parameters"] = sorted(names[p] for p in params)


def take(tensors: dict[str, np.ndarray], config: dict, model: Any, directory: str) -> dict[str, Adapter]:
    """Pop the expert factors from `tensors` (a PEFT file's) and return their Adapters by path."""
    found = collections.defaultdict(dict)  # (module, nesting) -> {"A": ..., "B": ...}
    for key in [k for k in tensors if _KEY.fullmatch(k)]:
        m = _KEY.fullmatch(key)
        found[m.group(1), m.group(2)][m.group(3)] = tensors.pop(key)
    if not found:
        return {}
    weights = dict(flat_paths(model.params))
    scanned = any(is_stacked(p) for p in weights)
    per_path = collections.defaultdict(dict)
    r_cfg, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (math.sqrt(r_cfg) if config.get("use_rslora") else r_cfg)
    for (module, _), ab in sorted(found.items()):
        layer = int(re.search(r"\.layers\.(\d+)\.", module).group(1))
        path = _expert_path(module, ab, weights, scanned, layer, directory)
        a, b = _from_peft(ab["A"], ab["B"], _shape(weights[path], scanned)[0])
        per_path[path][layer] = (a, b)
    out = {}
    for path, by_layer in per_path.items():
        if not scanned:
            (a, b), = by_layer.values()
            out[path] = Adapter(jnp.asarray(a), jnp.asarray(b), scale, (0,), (1,), (2,))
            continue
        if sorted(by_layer) != list(range(weights[path].shape[0])):
            raise LoraError(f"{directory}: '{path}' needs an adapter on every layer of the scanned stack")
        a, b = (np.stack([by_layer[i][j] for i in sorted(by_layer)]) for j in (0, 1))
        out[path] = Adapter(jnp.asarray(a), jnp.asarray(b), scale, (0, 1), (2,), (3,))
    return out


def _shape(w: Any, scanned: bool) -> tuple[int, ...]:
    return tuple(w.shape[1:] if scanned else w.shape)


def _expert_path(module: str, ab: dict, weights: dict, scanned: bool, layer: int, directory: str) -> str:
    """Which expert weight of `module` a pair of PEFT factors fits (by shape: in = A's, out = B's)."""
    if set(ab) != {"A", "B"}:
        raise LoraError(f"{directory}: '{module}' lacks lora_{'A' if 'A' not in ab else 'B'}")
    base = "params/" + module.replace(".", "/").replace(f"layers/{layer}", f"layers_{layer}")
    for param in EXPERT_PARAMS:
        path = f"{base}/{param}"
        path = stack_path(path) if scanned else path
        if path not in weights:
            continue
        E, n_in, n_out = _shape(weights[path], scanned)
        if ab["A"].shape[1] == n_in and ab["B"].shape[0] == n_out and ab["A"].shape[0] % E == 0 \
                and ab["A"].shape[0] == ab["B"].shape[1]:
            return path
    raise LoraError(f"{directory}: factors lora_A {ab['A'].shape}, lora_B {ab['B'].shape} under "
                    f"'{module}' fit none of its expert weights ({', '.join(EXPERT_PARAMS)})")
