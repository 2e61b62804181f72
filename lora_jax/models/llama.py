"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a Flax linen module.

Module names mirror Hugging Face (model/layers_3/self_attn/q_proj, mlp/gate_proj, ...), so a
PEFT or safetensors key maps to a params path by renaming alone. Every projection is a plain
nn.Dense with a 2-D [in, out] kernel used directly by dot_general; the tied head goes through
`embed_tokens.attend`. That keeps the forward traceable by the LoRA jaxpr rewrite.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.models.rope import apply_rope, inverse_frequencies, rope_tables

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The subset of an HF decoder config.json the forward needs; field names follow HF."""

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
    sliding_window: int | None = None  # Mistral
    model_type: str = "llama"
    scan_layers: bool = False
    remat: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Read an HF config.json dict; refuse options the forward would silently ignore."""
        model_type = hf.get("model_type", "llama")
        if model_type not in LLAMA_MODEL_TYPES:
            raise LoraError(f"model_type '{model_type}' is not a Llama-family decoder")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise LoraError(f"hidden_act '{act}' is not supported for {model_type} (only silu)")
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        window = hf.get("sliding_window") if model_type == "mistral" else None
        if model_type == "qwen2" and hf.get("use_sliding_window", False):
            raise LoraError("Qwen2 use_sliding_window=true is not supported")
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        params = hf.get("rope_parameters")  # transformers >= 5 folds theta and scaling here
        if params:
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            model_type=model_type,
        )
        fields.update(overrides)
        return cls(**fields)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back (as HF does)."""

    eps: float

    @nn.compact
    def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        scale_D = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],), jnp.float32)
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        ms_BxTx1 = jnp.mean(x32_BxTxD * x32_BxTxD, axis=-1, keepdims=True)
        normed_BxTxD = (x32_BxTxD * jax.lax.rsqrt(ms_BxTx1 + self.eps)).astype(x_BxTxD.dtype)
        return scale_D[None, None, :].astype(x_BxTxD.dtype) * normed_BxTxD


def _dense(features: int, bias: bool, name: str) -> nn.Dense:
    init = nn.initializers.normal(0.02)
    return nn.Dense(features, use_bias=bias, kernel_init=init, name=name)


class Attention(nn.Module):
    """Grouped-query attention: each of the KV heads serves H/KV query heads."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD, allowed_BxTxT, cos_BxTxK, sin_BxTxK):
        c = self.config
        B, T, _ = x_BxTxD.shape
        H, KV, K = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        G = H // KV
        q_BxTxHxK = _dense(H * K, c.qkv_bias, "q_proj")(x_BxTxD).reshape(B, T, H, K)
        k_BxTxVxK = _dense(KV * K, c.qkv_bias, "k_proj")(x_BxTxD).reshape(B, T, KV, K)
        v_BxTxVxK = _dense(KV * K, c.qkv_bias, "v_proj")(x_BxTxD).reshape(B, T, KV, K)
        q_BxTxHxK = apply_rope(q_BxTxHxK, cos_BxTxK, sin_BxTxK)
        k_BxTxVxK = apply_rope(k_BxTxVxK, cos_BxTxK, sin_BxTxK)
        q_BxTxVxGxK = q_BxTxHxK.reshape(B, T, KV, G, K)
        scores_BxVxGxTxS = jnp.einsum("btvgk,bsvk->bvgts", q_BxTxVxGxK, k_BxTxVxK)
        scores_BxVxGxTxS = scores_BxVxGxTxS.astype(jnp.float32) / jnp.sqrt(jnp.float32(K))
        allowed_Bx1x1xTxS = allowed_BxTxT[:, None, None, :, :]
        neg = jnp.finfo(jnp.float32).min
        scores_BxVxGxTxS = jnp.where(allowed_Bx1x1xTxS, scores_BxVxGxTxS, neg)
        probs_BxVxGxTxS = jax.nn.softmax(scores_BxVxGxTxS, axis=-1).astype(v_BxTxVxK.dtype)
        out_BxTxVxGxK = jnp.einsum("bvgts,bsvk->btvgk", probs_BxVxGxTxS, v_BxTxVxK)
        return _dense(c.hidden_size, c.o_bias, "o_proj")(out_BxTxVxGxK.reshape(B, T, H * K))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        gate_BxTxF = _dense(c.intermediate_size, c.mlp_bias, "gate_proj")(x_BxTxD)
        up_BxTxF = _dense(c.intermediate_size, c.mlp_bias, "up_proj")(x_BxTxD)
        return _dense(c.hidden_size, c.mlp_bias, "down_proj")(nn.silu(gate_BxTxF) * up_BxTxF)


class DecoderLayer(nn.Module):
    """Pre-norm block. Signature (carry, *broadcast) -> (carry, None) so nn.scan can stack it."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h_BxTxD, allowed_BxTxT, cos_BxTxK, sin_BxTxK):
        c = self.config
        normed_BxTxD = RMSNorm(c.rms_norm_eps, name="input_layernorm")(h_BxTxD)
        attn = Attention(c, name="self_attn")(normed_BxTxD, allowed_BxTxT, cos_BxTxK, sin_BxTxK)
        h_BxTxD = h_BxTxD + attn
        normed_BxTxD = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(h_BxTxD)
        return h_BxTxD + MLP(c, name="mlp")(normed_BxTxD), None


def attention_allowed(mask_BxT: jnp.ndarray, window: int | None) -> jnp.ndarray:
    """[B,T,S] bool: query t may see key s (causal, key not padding, within sliding window)."""
    T = mask_BxT.shape[1]
    q_T1 = jnp.arange(T)[:, None]
    k_1T = jnp.arange(T)[None, :]
    causal_TxT = k_1T <= q_T1
    if window is not None:
        causal_TxT = causal_TxT & (q_T1 - k_1T < window)
    return causal_TxT[None, :, :] & (mask_BxT[:, None, :] > 0)


class LlamaModel(nn.Module):
    """Embeddings, the layer stack (scanned or unrolled, optionally remat'ed), final norm."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids_BxT: jnp.ndarray, mask_BxT: jnp.ndarray):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens",
                         embedding_init=nn.initializers.normal(0.02))
        h_BxTxD = embed(input_ids_BxT)
        B, T = input_ids_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
        inv_freq_F = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        cos_BxTxK, sin_BxTxK = rope_tables(positions_BxT, inv_freq_F)
        allowed_BxTxT = attention_allowed(mask_BxT, c.sliding_window)
        layer_cls = nn.remat(DecoderLayer, prevent_cse=not c.scan_layers) if c.remat \
            else DecoderLayer
        if c.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                            length=c.num_hidden_layers)
            h_BxTxD, _ = stack(c, name="layers")(h_BxTxD, allowed_BxTxT, cos_BxTxK, sin_BxTxK)
        else:
            for i in range(c.num_hidden_layers):
                layer = layer_cls(c, name=f"layers_{i}")
                h_BxTxD, _ = layer(h_BxTxD, allowed_BxTxT, cos_BxTxK, sin_BxTxK)
        return RMSNorm(c.rms_norm_eps, name="norm")(h_BxTxD), embed


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; returns logits [B,T,V]. A tied head reuses embed_tokens."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, input_ids_BxT: jnp.ndarray, attention_mask_BxT: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        h_BxTxD, embed = LlamaModel(self.config, name="model")(input_ids_BxT, attention_mask_BxT)
        if self.config.tie_word_embeddings:
            return embed.attend(h_BxTxD)
        return _dense(self.config.vocab_size, False, "lm_head")(h_BxTxD)
