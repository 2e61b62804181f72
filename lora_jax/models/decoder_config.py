"""The decoder config: the subset of an HF config.json the Llama-family forward needs.

One dataclass serves Llama 2/3, Mistral, Qwen2, Qwen3 and Gemma 3 (text). The families differ
in switches, not in module layout: Qwen3 adds per-head q/k RMS norms; Gemma 3 adds those too,
plus (1 + w) norm gains, norms after attention and MLP, a sqrt(hidden) embedding scale, GeGLU,
query_pre_attn_scalar, alternating sliding-window (local) and full (global) layers with their
own RoPE bases, and optional tanh soft-capping of the final logits. Attention-logit capping
(Gemma 2's) is a field too, but transformers' Gemma 3 ignores its own config entry, so a
gemma3_text config that sets it is refused rather than run one way or the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_jax.errors import LoraError
from lora_jax.models.remat import policy_name

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ATTENTION_KERNELS = ("xla", "cudnn")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
_GEMMA3_PATTERN = 6  # every 6th Gemma 3 layer is global when config.json lists no layer_types


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Field names follow HF; the family switches default to plain Llama."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama attention_bias
    o_bias: bool = False  # Llama attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: every layer; Gemma 3: the sliding layers
    model_type: str = "llama"
    hidden_act: str = "silu"  # MLP gate activation: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMS norm of each query/key head before RoPE
    norm_plus_one: bool = False  # Gemma: every RMS norm's gain is (1 + w), computed in float32
    sandwich_norms: bool = False  # Gemma: norms on the attention and MLP outputs, pre-MLP norm
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size), in their dtype
    query_pre_attn_scalar: float | None = None  # Gemma: logits scale 1/sqrt(this), not 1/sqrt(K)
    attn_logit_softcapping: float | None = None  # cap * tanh(logits / cap) before the softmax
    final_logit_softcapping: float | None = None  # the same on the LM head's logits
    layer_types: tuple[str, ...] | None = None  # per layer: full_attention | sliding_attention
    local_rope_theta: float | None = None  # RoPE base of sliding layers (Gemma 3: 10k)
    local_rope_scaling: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    scan_layers: bool = False
    remat: str = "none"  # see lora_jax/models/remat.py
    attention: str = "xla"  # "xla" (any backend) or "cudnn" (fused flash kernel, NVIDIA GPUs, bf16)

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise LoraError(f"attention '{self.attention}' is not one of {ATTENTION_KERNELS}")
        if self.attention == "cudnn" and self.attn_logit_softcapping is not None:
            raise LoraError("attention 'cudnn' has no logit soft-capping; this model's config sets "
                            "attn_logit_softcapping (use attention 'xla')")
        if self.hidden_act not in ACTIVATIONS:
            raise LoraError(f"hidden_act '{self.hidden_act}' is not supported for "
                            f"{self.model_type} (supported: {', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            if len(types) != self.num_hidden_layers or not set(types) <= set(LAYER_TYPES):
                raise LoraError(f"layer_types needs {self.num_hidden_layers} entries from "
                                f"{LAYER_TYPES}; got {list(types)}")
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "remat", policy_name(self.remat))

    def layer_kinds(self) -> tuple[int, ...]:
        """Per layer: 0 for full (global) attention, 1 for sliding-window (local) attention."""
        if self.layer_types is None:
            return (1 if self.sliding_window is not None else 0,) * self.num_hidden_layers
        return tuple(int(t == "sliding_attention") for t in self.layer_types)

    def kind_rope(self, kind: int) -> tuple[float, dict[str, Any] | None]:
        """(theta, scaling) of RoPE for a layer kind; sliding layers may have their own base."""
        if kind == 1 and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling

    def kind_window(self, kind: int) -> int | None:
        return self.sliding_window if kind == 1 else None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Read an HF config.json dict; refuse options the forward would silently ignore."""
        model_type = hf.get("model_type", "llama")
        if model_type not in LLAMA_MODEL_TYPES:
            raise LoraError(f"model_type '{model_type}' is not a Llama-family decoder")
        gemma = model_type == "gemma3_text"
        act = (hf.get("hidden_activation") or "gelu_pytorch_tanh") if gemma else hf.get("hidden_act", "silu")
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        window = hf.get("sliding_window") if model_type in ("mistral", "gemma3_text") else None
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
            raise LoraError(f"{model_type} use_sliding_window=true is not supported")
        if gemma and hf.get("use_bidirectional_attention"):
            raise LoraError("gemma3_text use_bidirectional_attention=true is not supported "
                            "(causal decoders only)")
        if gemma and hf.get("attn_logit_softcapping") is not None:
            raise LoraError(f"gemma3_text attn_logit_softcapping={hf['attn_logit_softcapping']}: "
                            "transformers' Gemma 3 never applies it, so neither would match the "
                            "other; set it to null")
        rope_theta, rope_scaling, local = _rope(hf, gemma)
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            model_type=model_type,
            hidden_act=act,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
        )
        if gemma:
            fields.update(
                norm_plus_one=True, sandwich_norms=True, embed_scale=True,
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                final_logit_softcapping=hf.get("final_logit_softcapping"),
                layer_types=tuple(hf.get("layer_types") or _gemma3_layer_types(hf)),
                local_rope_theta=local[0], local_rope_scaling=local[1],
            )
        fields.update(overrides)
        return cls(**fields)


def _gemma3_layer_types(hf: dict[str, Any]) -> list[str]:
    pattern = hf.get("sliding_window_pattern", _GEMMA3_PATTERN)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(hf["num_hidden_layers"])]


def _scaling(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rope parameters dict as rope.py reads it, or None when it only names the default."""
    if not params or params.get("rope_type", params.get("type", "default")) == "default":
        return None
    return params


def _rope(hf: dict[str, Any], gemma: bool) -> tuple[float, Any, tuple[float | None, Any]]:
    """(global theta, global scaling, (local theta, local scaling)) from either config layout:
    rope_theta / rope_scaling (/ rope_local_base_freq), or transformers 5's rope_parameters
    (per layer type for Gemma 3)."""
    params = hf.get("rope_parameters") or {}
    if gemma:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        theta = full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
        scaling = _scaling(full) or _scaling(hf.get("rope_scaling"))
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        return float(theta), scaling, (float(local_theta), _scaling(local))
    theta = params.get("rope_theta", hf.get("rope_theta"))
    scaling = _scaling(params) or hf.get("rope_scaling")
    return float(theta if theta is not None else 10000.0), scaling, (None, None)
