"""Llama-family decoders (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 3 text) as a Flax linen module.

Module names mirror Hugging Face (model/layers_3/self_attn/q_proj, mlp/gate_proj, ...), so a
PEFT or safetensors key maps to a params path by renaming alone. Every projection is a plain
nn.Dense with a 2-D [in, out] kernel used directly by dot_general; the tied head goes through
`embed_tokens.attend`. That keeps the forward traceable by the LoRA jaxpr rewrite.

Passing a `cache` (from `init_cache`) switches to incremental decoding: new K/V are written into
fixed-size per-layer buffers at `cache["index"]` and queries attend over every filled slot, so
one compiled step serves a whole generation. Without a cache the forward is unchanged.

Layers differ only by kind (0 full attention, 1 sliding window, each with its own RoPE table):
the masks and tables of every kind are built once and each layer indexes its own, so a scanned
stack of Gemma 3's alternating local/global layers is still one compiled layer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.models.decoder_config import LlamaConfig
from lora_jax.models.moe import MoeBlock, is_moe
from lora_jax.models.precision import grouped_attention
from lora_jax.models.remat import tag, wrap_layer
from lora_jax.models.rope import apply_rope, inverse_frequencies, rope_tables


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, in float32, as HF does: Llama casts back before
    the gain; Gemma (`plus_one`) multiplies by (1 + w) in float32 and casts after."""

    eps: float
    plus_one: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale_D = self.param("scale", init, (x_BxTxD.shape[-1],), jnp.float32)
        scale_D = scale_D.reshape((1,) * (x_BxTxD.ndim - 1) + scale_D.shape)  # any leading axes
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        ms_BxTx1 = jnp.mean(x32_BxTxD * x32_BxTxD, axis=-1, keepdims=True)
        normed32_BxTxD = x32_BxTxD * jax.lax.rsqrt(ms_BxTx1 + self.eps)
        if self.plus_one:
            return (normed32_BxTxD * (1.0 + scale_D.astype(jnp.float32))).astype(x_BxTxD.dtype)
        return scale_D.astype(x_BxTxD.dtype) * normed32_BxTxD.astype(x_BxTxD.dtype)


def _norm(c: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(c.rms_norm_eps, c.norm_plus_one, name=name)


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
        if c.qk_norm:  # Qwen3 / Gemma 3: per-head norms before RoPE
            q_BxTxHxK = _norm(c, "q_norm")(q_BxTxHxK)
            k_BxSxVxK = _norm(c, "k_norm")(k_BxSxVxK)
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
        scale = (c.query_pre_attn_scalar or K) ** -0.5
        if c.attention == "xla":
            out_BxTxHxK = grouped_attention(q_BxTxHxK, k_BxSxVxK, v_BxSxVxK, allowed_BxTxS,
                                            scale=scale, softcap=c.attn_logit_softcapping)
        else:
            out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxVxK, v_BxSxVxK,
                                                       mask=allowed_BxTxS[:, None, :, :],
                                                       scale=scale, implementation="cudnn")
        out_BxTxHK = tag(out_BxTxHxK.reshape(B, T, H * K), "attention_out")
        out_BxTxD = tag(_dense(c.hidden_size, c.o_bias, "o_proj")(out_BxTxHK), "out_proj")
        return out_BxTxD if kv is None else (out_BxTxD, (k_BxSxVxK, v_BxSxVxK))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (silu) or Gemma's GeGLU (tanh gelu)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        gate_BxTxF = _dense(c.intermediate_size, c.mlp_bias, "gate_proj")(x_BxTxD)
        up_BxTxF = _dense(c.intermediate_size, c.mlp_bias, "up_proj")(x_BxTxD)
        gelu = c.hidden_act == "gelu_pytorch_tanh"
        act_BxTxF = nn.gelu(gate_BxTxF, approximate=True) if gelu else nn.silu(gate_BxTxF)
        return _dense(c.hidden_size, c.mlp_bias, "down_proj")(act_BxTxF * up_BxTxF)


def _pick(table_NxX: jnp.ndarray, kind: Any) -> jnp.ndarray:
    """A layer's own mask or RoPE table from the stack of every kind's (one kind: no indexing)."""
    if table_NxX.shape[0] == 1:
        return table_NxX[0]
    return jax.lax.dynamic_index_in_dim(table_NxX, kind, axis=0, keepdims=False)


class DecoderLayer(nn.Module):
    """Pre-norm block. Signature (carry, *broadcast, kind) -> (carry, ys) so nn.scan can stack
    it; `kind` picks the layer's mask and RoPE table from the [N,...] stacks; ys is the layer's
    updated (K, V) cache when `kv` is given, else None. Gemma's sandwich norms wrap the
    attention and MLP outputs too (its post_attention_layernorm is on the attention output)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, h_BxTxD, allowed_NxBxTxS, cos_NxBxTxK, sin_NxBxTxK, kind, kv=None,
                 index=None):
        c = self.config
        tables = [_pick(t, kind) for t in (allowed_NxBxTxS, cos_NxBxTxK, sin_NxBxTxK)]
        normed_BxTxD = _norm(c, "input_layernorm")(h_BxTxD)
        attn = Attention(c, name="self_attn")(normed_BxTxD, *tables, kv, index)
        attn, new_kv = attn if kv is not None else (attn, None)
        if c.sandwich_norms:
            attn = _norm(c, "post_attention_layernorm")(attn)
        h_BxTxD = h_BxTxD + attn
        pre_mlp = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
        mlp_cls = MoeBlock if is_moe(c) else MLP  # Qwen3-MoE / Mixtral: routed experts
        mlp_BxTxD = mlp_cls(c, name="mlp")(_norm(c, pre_mlp)(h_BxTxD))
        if c.sandwich_norms:
            mlp_BxTxD = _norm(c, "post_feedforward_layernorm")(mlp_BxTxD)
        return h_BxTxD + mlp_BxTxD, new_kv


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
        if c.embed_scale:  # Gemma: sqrt(D) rounded to the embedding's dtype first, as HF does
            h_BxTxD = h_BxTxD * jnp.asarray(np.float32(c.hidden_size ** 0.5), h_BxTxD.dtype)
        B, T = input_ids_BxT.shape
        if positions_BxT is None:
            steps_T = jnp.arange(T) if cache is None else cache["index"] + jnp.arange(T)
            positions_BxT = jnp.broadcast_to(steps_T[None, :], (B, T))
        index = None
        if cache is not None:
            index = cache["index"]
            zero = jnp.zeros((), jnp.int32)
            cache_mask_BxS = jax.lax.dynamic_update_slice(
                cache["mask"], mask_BxT.astype(jnp.int32), (zero, index))
        kinds_L = c.layer_kinds()
        present = sorted(set(kinds_L))  # the layer kinds this model has; tables for those only
        per_kind = []
        for kind in present:
            theta, scaling = c.kind_rope(kind)
            cos_BxTxK, sin_BxTxK = rope_tables(positions_BxT,
                                               inverse_frequencies(c.head_dim, theta, scaling))
            if cache is None:
                allowed_BxTxS = attention_allowed(mask_BxT, c.kind_window(kind))
            else:
                allowed_BxTxS = cached_attention_allowed(cache_mask_BxS, index, T,
                                                         c.kind_window(kind))
            per_kind.append((allowed_BxTxS, cos_BxTxK, sin_BxTxK))
        tables = [jnp.stack(parts) for parts in zip(*per_kind, strict=True)]
        slots_L = [present.index(kind) for kind in kinds_L]
        layer_cls = wrap_layer(DecoderLayer, c.remat, c.scan_layers)
        if c.scan_layers:
            in_axes = (nn.broadcast,) * 3 + (0,) + ((0, nn.broadcast) if cache is not None else ())
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=in_axes, length=c.num_hidden_layers)
            extra = () if cache is None else ((cache["k"], cache["v"]), index)
            h_BxTxD, kv = stack(c, name="layers")(h_BxTxD, *tables,
                                                  jnp.asarray(slots_L, jnp.int32), *extra)
            new_k, new_v = kv if cache is not None else (None, None)
        else:
            ks, vs = [], []
            for i in range(c.num_hidden_layers):
                layer = layer_cls(c, name=f"layers_{i}")
                extra = () if cache is None else ((cache["k"][i], cache["v"][i]), index)
                own = [t[slots_L[i]:slots_L[i] + 1] for t in tables]  # one kind: no indexing
                h_BxTxD, kv = layer(h_BxTxD, *own, 0, *extra)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_k, new_v = tuple(ks), tuple(vs)
        h_BxTxD = _norm(c, "norm")(h_BxTxD)
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
        logits_BxTxV = softcap(logits_BxTxV, self.config.final_logit_softcapping)
        return logits_BxTxV if cache is None else (logits_BxTxV, out[2])


def softcap(x: jnp.ndarray, cap: float | None) -> jnp.ndarray:
    """cap * tanh(x / cap) (Gemma's logit soft-capping), in x's dtype; identity without a cap."""
    if cap is None:
        return x
    return jnp.tanh(x / jnp.asarray(cap, x.dtype)) * jnp.asarray(cap, x.dtype)


def head_weight(config: LlamaConfig, params: Any) -> tuple[jax.Array, bool]:
    """The LM head's weight as the forward uses it, and whether it is the tied embedding:
    (lm_head kernel [D,V], False) or (embed_tokens embedding [V,D], True)."""
    p = params["params"]
    if config.tie_word_embeddings:
        return p["model"]["embed_tokens"]["embedding"], True
    return p["lm_head"]["kernel"], False
