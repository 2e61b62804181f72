"""`save_pretrained`: Flax params -> an HF directory (config.json + model.safetensors).

The inverse of `load`: kernels are transposed back to torch's [out, in], scanned stacks are split
into one tensor per layer. Merge LoRA into the params first (lora_jax.merge) to export a
fine-tuned model that plain transformers can load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from lora_jax.models.hf_names import flax_to_hf, is_stacked
from lora_jax.models.loading import LoadedModel
from lora_jax.models.moe_checkpoint import expert_tensors, is_expert_path
from lora_jax.paths import flat_paths

_ENCODER_ARCH = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "merges.txt", "vocab.json", "tokenizer.model",
)


def hf_state_dict(params: Any) -> dict[str, np.ndarray]:
    """HF-named host arrays for a params pytree (torch layout, one tensor per layer)."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat_paths(params):
        array = np.asarray(jax.device_get(leaf))
        if is_expert_path(path):  # MoE experts: 3-D, named as transformers 5 holds them
            out.update(expert_tensors(path, array))
            continue
        if is_stacked(path):
            pieces = [(flax_to_hf(path, i), array[i]) for i in range(array.shape[0])]
        else:
            pieces = [(flax_to_hf(path), array)]
        for (key, transposed), piece in pieces:
            out[key] = np.ascontiguousarray(piece.T if transposed else piece)
    return out


def _dtype_name(tensors: dict[str, np.ndarray]) -> str:
    for array in tensors.values():
        if jnp.issubdtype(array.dtype, jnp.floating):
            return str(jnp.dtype(array.dtype))
    return "float32"


def save_pretrained(model: LoadedModel, params: Any, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) loadable by transformers.

    Encoders are written as the bare base model (BertModel / RobertaModel), heads dropped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(params)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = dict(model.hf_config)
    if model.family == "bert":
        hf_config["architectures"] = [_ENCODER_ARCH[model.config.model_type]]
    dtype = _dtype_name(tensors)
    hf_config["dtype"] = dtype
    if "torch_dtype" in hf_config:
        hf_config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if model.source:
        source = Path(model.source)
        for name in _TOKENIZER_FILES:
            if (source / name).is_file() and source.resolve() != out.resolve():
                shutil.copyfile(source / name, out / name)
    return out
