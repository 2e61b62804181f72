"""Adapters in Hugging Face PEFT's format, for PEFT itself and for servers that read it (vLLM).

On disk: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r] (our A and B
transposed), or `lora_embedding_A` [r, vocab] / `lora_embedding_B` [dim, r] for embeddings;
DoRA adds `...lora_magnitude_vector` [out] per module and `use_dora: true` in the config.
Scaling is recomputed from r, lora_alpha and use_rslora on load, never taken on trust.
Files we write carry a SHA-256 of each tensor in the safetensors metadata (`lora_jax.sha256`,
which PEFT ignores); `load_adapter` refuses a file whose tensors do not match it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_jax import peft_experts
from lora_jax.adapters import Adapter, adapter_items
from lora_jax.errors import LoraError
from lora_jax.models.hf_names import flax_to_hf, hf_to_flax, is_stacked, stack_path
from lora_jax.models.moe import is_moe
from lora_jax.paths import flat_paths, nest
from lora_jax.quant.weight import is_quantized

PREFIX = "base_model.model."
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CHECKSUM_KEY = "lora_jax.sha256"
MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA magnitude [out], saved without ".weight"
VLLM_DORA = ("vLLM does not serve DoRA adapters (use_dora); to serve this one, export the merged "
             "weights (python -m experiments.export --to=merged)")
_TASK_TYPES = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def _modules(adapters: Any) -> list[tuple[str, np.ndarray, np.ndarray, float, bool, Any]]:
    """(HF module name, A [in, r], B [r, out], scale, is_embedding, DoRA m [out] or None) per
    layer and weight."""
    out = []
    items = adapter_items(adapters)
    if len({ad.is_dora for _, ad in items}) > 1:
        plain = next(p for p, ad in items if not ad.is_dora)
        raise LoraError(f"adapter '{plain}' is plain LoRA beside DoRA adapters; PEFT's use_dora "
                        "holds for every module of an adapter")
    for path, ad in items:
        a, b = np.asarray(ad.a, np.float32), np.asarray(ad.b, np.float32)
        m = None if ad.m is None else np.asarray(ad.m, np.float32)
        if len(ad.inputs) != 1 or len(ad.outputs) != 1 or len(ad.stack) > 1:
            raise LoraError(f"adapter '{path}' factors a {ad.w_ndim}-d weight; PEFT holds 2-d ones only")
        embedding = path.endswith("/embedding")
        layers = [(None, a, b, m)] if not ad.stack else [
            (i, a[i], b[i], None if m is None else m[i]) for i in range(a.shape[0])]
        for layer, a_l, b_l, m_l in layers:
            key, _ = flax_to_hf(path, layer)
            out.append((key.rsplit(".", 1)[0], a_l, b_l, ad.scale, embedding, m_l))
    return out


def save_adapter(directory: str, adapters: Any, model: Any, rslora: bool = False) -> None:
    """Write `adapters` (made for `model`, as returned by `lora_jax.models.load`) in PEFT's format.

    With `rslora`, the config says use_rslora and lora_alpha = scale·√r; otherwise scale·r.
    Modules whose rank or alpha differ from the most common go to rank_pattern / alpha_pattern.
    DoRA adapters write use_dora and each module's `lora_magnitude_vector` [out]; PEFT loads
    them, vLLM does not serve them (a warning says so; export merged weights to serve one).
    """
    adapters, experts = peft_experts.split(adapters)  # MoE expert weights: target_parameters
    mods = _modules(adapters)
    if not mods and not experts:
        raise LoraError("no adapters to save")
    tensors, ranks, alphas = peft_experts.save_tensors(experts, rslora)
    for name, a, b, scale, embedding, m in mods:
        r = a.shape[-1]
        ranks[name], alphas[name] = r, scale * (math.sqrt(r) if rslora else r)
        kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{name}.{kind[0]}"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{name}.{kind[1]}"] = np.ascontiguousarray(b.T)
        if m is not None:
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = np.ascontiguousarray(m)
    use_dora = bool(mods) and mods[0][5] is not None
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": _TASK_TYPES.get(model.family),
        "base_model_name_or_path": model.source, "r": int(r), "lora_alpha": float(alpha),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}),
        "rank_pattern": {f"^{n}$": int(v) for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{n}$": float(v) for n, v in alphas.items() if v != alpha},
        "use_rslora": bool(rslora), "use_dora": use_dora, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True,
    }
    peft_experts.place_targets(config, is_moe(model.config))
    bad_ranks = sorted({v for v in ranks.values() if v not in VLLM_RANKS})
    if bad_ranks:
        warnings.warn(f"vLLM cannot serve ranks {bad_ranks}; it accepts {VLLM_RANKS}", stacklevel=2)
    if use_dora:
        warnings.warn(VLLM_DORA, stacklevel=2)
    os.makedirs(directory, exist_ok=True)
    sums = json.dumps({k: _sha256(v) for k, v in tensors.items()}, sort_keys=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"),
              metadata={"format": "pt", CHECKSUM_KEY: sums})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT: the key matches the module name's tail
        if re.match(rf"(.*\.)?({key.lstrip('^').rstrip('$')})$", module):
            return value
    return default


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    """The file's tensors, checked against the checksums we wrote into its metadata (if any)."""
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # a truncated or garbled file
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise LoraError(f"{path} is unreadable ({type(e).__name__}: {reason})") from None
    if CHECKSUM_KEY not in metadata:  # written by PEFT or another tool: nothing to check against
        return tensors
    try:
        saved = json.loads(metadata[CHECKSUM_KEY])
    except ValueError:
        raise LoraError(f"{path} is damaged: its {CHECKSUM_KEY} metadata is not valid JSON") from None
    wrong = [k for k in sorted(set(saved) | set(tensors))
             if k not in tensors or saved.get(k) != _sha256(tensors[k])]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise LoraError(f"{path} is damaged: tensor '{wrong[0]}'{more} does not match the SHA-256 "
                        "saved with it; refusing to load it")
    return tensors


def _read(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    cfg_path = os.path.join(directory, "adapter_config.json")
    st_path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.exists(st_path):
        if any(os.path.exists(os.path.join(directory, f)) for f in ("adapter_model.bin", "adapter_model.pt")):
            raise LoraError(f"{directory} holds only a pickle adapter (adapter_model.bin); pickle files "
                            "are not loaded, convert it to adapter_model.safetensors")
        raise LoraError(f"no PEFT adapter at {directory}: expected {st_path}")
    if not os.path.exists(cfg_path):
        raise LoraError(f"no adapter_config.json in {directory}")
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{directory} is a {config.get('peft_type')} adapter; only LoRA (and DoRA, "
                        "LoRA with use_dora) is supported")
    return config, _read_tensors(st_path)


def load_adapter(directory: str, model: Any) -> Any:
    """Adapters for `model` from a PEFT directory; shapes are checked against the model's params.
    A DoRA adapter (use_dora) needs each module's lora_magnitude_vector."""
    config, tensors = _read(directory)
    experts = peft_experts.take(tensors, config, model, directory)
    use_dora = bool(config.get("use_dora"))
    pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|"
                             rf"lora_embedding_A|lora_embedding_B|{MAGNITUDE}(?:\.weight)?)", key)
        if match is None:
            raise LoraError(f"{directory}: tensor '{key}' is not a LoRA factor or DoRA magnitude "
                            "(modules_to_save and biases are not supported)")
        part = "m" if match.group(2).startswith(MAGNITUDE) else "A" if "_A" in match.group(2) else "B"
        pairs[match.group(1)][part] = value
    for module, parts in sorted(pairs.items()):
        if not {"A", "B"} <= set(parts):
            raise LoraError(f"{directory}: module '{module}' lacks lora_{'A' if 'A' not in parts else 'B'}")
        if use_dora != ("m" in parts):
            raise LoraError(f"{directory}: module '{module}' " + (
                f"has no {MAGNITUDE}, which a DoRA adapter (use_dora) needs for every module"
                if use_dora else f"has a {MAGNITUDE} but the config says use_dora is false"))
    weights = dict(flat_paths(model.params, is_leaf=is_quantized))  # a QuantizedWeight: one weight
    scanned = any(is_stacked(p) for p in weights)
    per_layer: dict[str, list] = collections.defaultdict(list)
    for module, ab in sorted(pairs.items()):
        path, _ = hf_to_flax(module)
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        a, b = ab["A"].T.astype(np.float32), ab["B"].T.astype(np.float32)
        target = stack_path(path) if scanned else path
        if target not in weights:
            raise LoraError(f"{directory}: module '{module}' has no weight '{target}' in this model")
        w_shape = weights[target].shape[1:] if scanned and target != path else weights[target].shape
        if (a.shape[0], b.shape[1]) != tuple(w_shape) or a.shape[1] != b.shape[0]:
            raise LoraError(f"{directory}: '{module}' has lora_A {ab['A'].shape}, lora_B {ab['B'].shape}, "
                            f"which do not fit the weight {tuple(w_shape)} of this model")
        m = ab.get("m")
        if m is not None and tuple(m.shape) != (w_shape[1],):
            raise LoraError(f"{directory}: '{module}' has {MAGNITUDE} {tuple(m.shape)}; the weight "
                            f"{tuple(w_shape)} needs ({w_shape[1]},)")
        per_layer[target].append((path, a, b, scale, None if m is None else m.astype(np.float32)))
    out = {}
    for target, items in per_layer.items():
        if target in {p for p, *_ in items}:
            (_, a, b, scale, m), = items
            out[target] = Adapter(jnp.asarray(a), jnp.asarray(b), scale, (), (0,), (1,),
                                  m=None if m is None else jnp.asarray(m))
        else:  # a scanned stack: one entry per layer, in layer order
            items.sort(key=lambda t: int(re.search(r"_(\d+)/", t[0]).group(1)))
            if len({t[3] for t in items}) != 1 or len(items) != weights[target].shape[0]:
                raise LoraError(f"{directory}: '{target}' needs one adapter of one scale per layer")
            m = None if items[0][4] is None else jnp.asarray(np.stack([t[4] for t in items]))
            out[target] = Adapter(jnp.asarray(np.stack([t[1] for t in items])),
                                  jnp.asarray(np.stack([t[2] for t in items])), items[0][3], (0,), (1,), (2,),
                                  m=m)
    return nest({**out, **experts})
