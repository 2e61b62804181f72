"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a Flax linen module.

Module names mirror Hugging Face (model/layers_3/self_attn/q_proj, mlp/gate_proj, ...), so a
PEFT or safetensors key maps to a params path by renaming alone. Every projection is a plain
nn.Dense with a 2-D [in, out] kernel used directly by dot_general; the tied head goes through
`embed_tokens.attend`. That keeps the forward traceable by the LoRA jaxpr rewrite.

Passing a `cache` (from `init_cache`) switches to incremental decoding: new K/V are written into
fixed-size per-layer buffers at `cache["index"]` and queries attend over every filled slot, so
one compiled step serves a whole generation. Without a cache the forward is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.models.precision import grouped_attention
from lora_jax.models.remat import policy_name, tag, wrap_layer
from lora_jax.models.rope import apply_rope, inverse_frequencies, rope_tables

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_KERNELS = ("xla", "cudnn")


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
    remat: str = "none"  # see lora_jax/models/remat.py
    attention: str = "xla"  # "xla" (any backend) or "cudnn" (fused flash kernel, NVIDIA GPUs, bf16)

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise LoraError(f"attention '{self.attention}' is not one of {ATTENTION_KERNELS}")
        object.__setattr__(self, "remat", policy_name(self.remat))

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
    """Grouped-query attention: each of the KV heads serves H/KV query heads.

    With `kv` (K and V cache buffers [B,S,KV,K]) the new keys/values are written at slot `index`
    and the queries attend over all S slots; the updated buffers are returned with the output.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD, allowed_BxTxS, cos_BxTxK, sin_BxTxK, kv=None, index=None):
        c = self.config
        B, T, _ = x_BxTxD.shape
        H, KV, K = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_BxTxHxK = tag(_dense(H * K, c.qkv_bias, "q_proj")(x_BxTxD), "query_proj").reshape(B, T, H, K)
        k_BxSxVxK = tag(_dense(KV * K, c.qkv_bias, "k_proj")(x_BxTxD), "key_proj").reshape(B, T, KV, K)
        v_BxSxVxK = tag(_dense(KV * K, c.qkv_bias, "v_proj")(x_BxTxD), "value_proj").reshape(B, T, KV, K)
        q_BxTxHxK = apply_rope(q_BxTxHxK, cos_BxTxK, sin_BxTxK)
        k_BxSxVxK = apply_rope(k_BxSxVxK, cos_BxTxK, sin_BxTxK)
        if kv is not None:
            zero = jnp.zeros((), jnp.int32)
            start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
            k_BxSxVxK = jax.lax.dynamic_update_slice(kv[0], k_BxSxVxK.astype(kv[0].dtype), start)
            v_BxSxVxK = jax.lax.dynamic_update_slice(kv[1], v_BxSxVxK.astype(kv[1].dtype), start)
        if c.attention == "cudnn" and q_BxTxHxK.dtype not in (jnp.bfloat16, jnp.float16):
            raise LoraError(f"attention='cudnn' needs bfloat16 or float16 activations, got "
                            f"{q_BxTxHxK.dtype}; load the model with dtype=jnp.bfloat16")
        # Logits and softmax in float32 on either kernel; `allowed` carries causality, padding and
        # the sliding window, so one boolean mask serves training and cached decoding alike.
        k_BxSxVxK, v_BxSxVxK = k_BxSxVxK.astype(q_BxTxHxK.dtype), v_BxSxVxK.astype(q_BxTxHxK.dtype)
        if c.attention == "xla":
            out_BxTxHxK = grouped_attention(q_BxTxHxK, k_BxSxVxK, v_BxSxVxK, allowed_BxTxS)
        else:
            out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxVxK, v_BxSxVxK,
                                                       mask=allowed_BxTxS[:, None, :, :],
                                                       implementation="cudnn")
        out_BxTxHK = tag(out_BxTxHxK.reshape(B, T, H * K), "attention_out")
        out_BxTxD = tag(_dense(c.hidden_size, c.o_bias, "o_proj")(out_BxTxHK), "out_proj")
        return out_BxTxD if kv is None else (out_BxTxD, (k_BxSxVxK, v_BxSxVxK))


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
    """Pre-norm block. Signature (carry, *broadcast) -> (carry, ys) so nn.scan can stack it;
    ys is the layer's updated (K, V) cache when `kv` is given, else None."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h_BxTxD, allowed_BxTxS, cos_BxTxK, sin_BxTxK, kv=None, index=None):
        c = self.config
        normed_BxTxD = RMSNorm(c.rms_norm_eps, name="input_layernorm")(h_BxTxD)
        attn = Attention(c, name="self_attn")(normed_BxTxD, allowed_BxTxS, cos_BxTxK, sin_BxTxK,
                                              kv, index)
        attn, new_kv = attn if kv is not None else (attn, None)
        h_BxTxD = h_BxTxD + attn
        normed_BxTxD = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(h_BxTxD)
        return h_BxTxD + MLP(c, name="mlp")(normed_BxTxD), new_kv


def attention_allowed(mask_BxT: jnp.ndarray, window: int | None) -> jnp.ndarray:
    """[B,T,S] bool: query t may see key s (causal, key not padding, within sliding window)."""
    T = mask_BxT.shape[1]
    q_T1 = jnp.arange(T)[:, None]
    k_1T = jnp.arange(T)[None, :]
    causal_TxT = k_1T <= q_T1
    if window is not None:
        causal_TxT = causal_TxT & (q_T1 - k_1T < window)
    return causal_TxT[None, :, :] & (mask_BxT[:, None, :] > 0)


def cached_attention_allowed(
    cache_mask_BxS: jnp.ndarray, index: jnp.ndarray, T: int, window: int | None
) -> jnp.ndarray:
    """[B,T,S] bool for T queries written at cache slots index..index+T-1 (slot order is time
    order, and left padding keeps real tokens contiguous, so slot distance = position distance)."""
    S = cache_mask_BxS.shape[1]
    q_Tx1 = (index + jnp.arange(T, dtype=jnp.int32))[:, None]
    k_1xS = jnp.arange(S, dtype=jnp.int32)[None, :]
    causal_TxS = k_1xS <= q_Tx1
    if window is not None:
        causal_TxS = causal_TxS & (q_Tx1 - k_1xS < window)
    return causal_TxS[None, :, :] & (cache_mask_BxS[:, None, :] > 0)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """Empty decode cache: K/V buffers [B,max_len,KV,K] per layer (stacked [L,...] when the
    layers are scanned), the slot mask [B,max_len] and the next write slot `index`."""
    c = config
    shape = (batch, max_len, c.num_key_value_heads, c.head_dim)
    if c.scan_layers:
        k = v = jnp.zeros((c.num_hidden_layers, *shape), dtype)
    else:
        k = v = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers))
    return {"k": k, "v": v, "mask": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


class LlamaModel(nn.Module):
    """Embeddings, the layer stack (scanned or unrolled, optionally remat'ed), final norm."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids_BxT: jnp.ndarray, mask_BxT: jnp.ndarray,
                 positions_BxT: jnp.ndarray | None = None, cache: dict | None = None):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens",
                         embedding_init=nn.initializers.normal(0.02))
        h_BxTxD = embed(input_ids_BxT)
        B, T = input_ids_BxT.shape
        if positions_BxT is None:
            steps_T = jnp.arange(T) if cache is None else cache["index"] + jnp.arange(T)
            positions_BxT = jnp.broadcast_to(steps_T[None, :], (B, T))
        inv_freq_F = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        cos_BxTxK, sin_BxTxK = rope_tables(positions_BxT, inv_freq_F)
        index = None
        if cache is None:
            allowed_BxTxS = attention_allowed(mask_BxT, c.sliding_window)
        else:
            index = cache["index"]
            zero = jnp.zeros((), jnp.int32)
            cache_mask_BxS = jax.lax.dynamic_update_slice(
                cache["mask"], mask_BxT.astype(jnp.int32), (zero, index))
            allowed_BxTxS = cached_attention_allowed(cache_mask_BxS, index, T, c.sliding_window)
        rope = (allowed_BxTxS, cos_BxTxK, sin_BxTxK)
        layer_cls = wrap_layer(DecoderLayer, c.remat, c.scan_layers)
        if c.scan_layers:
            in_axes = (nn.broadcast,) * 3 + ((0, nn.broadcast) if cache is not None else ())
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=in_axes, length=c.num_hidden_layers)
            extra = () if cache is None else ((cache["k"], cache["v"]), index)
            h_BxTxD, kv = stack(c, name="layers")(h_BxTxD, *rope, *extra)
            new_k, new_v = kv if cache is not None else (None, None)
        else:
            ks, vs = [], []
            for i in range(c.num_hidden_layers):
                layer = layer_cls(c, name=f"layers_{i}")
                extra = () if cache is None else ((cache["k"][i], cache["v"][i]), index)
                h_BxTxD, kv = layer(h_BxTxD, *rope, *extra)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_k, new_v = tuple(ks), tuple(vs)
        h_BxTxD = RMSNorm(c.rms_norm_eps, name="norm")(h_BxTxD)
        if cache is None:
            return h_BxTxD, embed
        new_cache = {"k": new_k, "v": new_v, "mask": cache_mask_BxS, "index": index + T}
        return h_BxTxD, embed, new_cache


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; returns logits [B,T,V]. A tied head reuses embed_tokens.

    With `cache` it returns (logits, updated cache); `positions_BxT` are the RoPE positions
    (default: 0..T-1, or continuing from the cache's write slot). `hidden_only` returns the
    final-norm hidden states [B,T,D] instead of logits, for a loss that applies the head itself
    chunk by chunk (lora_jax/models/lm_loss.py; the weight is `head_weight`).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, input_ids_BxT: jnp.ndarray, attention_mask_BxT: jnp.ndarray | None = None,
        positions_BxT: jnp.ndarray | None = None, cache: dict | None = None,
        hidden_only: bool = False,
    ) -> Any:
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        out = LlamaModel(self.config, name="model")(input_ids_BxT, attention_mask_BxT,
                                                    positions_BxT, cache)
        h_BxTxD, embed = out[0], out[1]
        if hidden_only:
            return h_BxTxD if cache is None else (h_BxTxD, out[2])
        if self.config.tie_word_embeddings:
            logits_BxTxV = embed.attend(h_BxTxD)
        else:
            logits_BxTxV = _dense(self.config.vocab_size, False, "lm_head")(h_BxTxD)
        return logits_BxTxV if cache is None else (logits_BxTxV, out[2])


def head_weight(config: LlamaConfig, params: Any) -> tuple[jax.Array, bool]:
    """The LM head's weight as the forward uses it, and whether it is the tied embedding:
    (lm_head kernel [D,V], False) or (embed_tokens embedding [V,D], True)."""
    p = params["params"]
    if config.tie_word_embeddings:
        return p["model"]["embed_tokens"]["embedding"], True
    return p["lm_head"]["kernel"], False
