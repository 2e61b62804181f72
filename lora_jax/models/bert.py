"""BERT-style encoder (BERT, MiniLM, RoBERTa checkpoints) as a Flax linen module.

Names mirror Hugging Face (embeddings/word_embeddings, encoder/layer_0/attention/self/query, ...)
so safetensors and PEFT keys map by renaming. Projections are plain nn.Dense with 2-D kernels,
embeddings are gathers, so the LoRA jaxpr rewrite sees every weight at its point of use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.models.remat import policy_name, tag, wrap_layer

BERT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
_ACTS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # -> approximate?


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of an HF encoder config.json the forward needs; field names follow HF."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    model_type: str = "bert"
    add_pooler: bool = False
    scan_layers: bool = False
    remat: str = "none"  # see lora_jax/models/remat.py
    # The checkpoint's dropout rates; applied only when the forward gets a "dropout" rng
    # (`LoadedModel.dropout_fn`, the main job's model.dropout), never in evaluation.
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "remat", policy_name(self.remat))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> BertConfig:
        """Read an HF config.json dict; refuse options the forward would silently ignore."""
        model_type = hf.get("model_type", "bert")
        if model_type not in BERT_MODEL_TYPES:
            raise LoraError(f"model_type '{model_type}' is not a BERT-style encoder")
        act = hf.get("hidden_act", "gelu")
        if act not in _ACTS:
            raise LoraError(f"hidden_act '{act}' is not supported (gelu, gelu_new are)")
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise LoraError(f"position_embedding_type '{pos_type}' is not supported")
        fields = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
        fields["model_type"] = model_type
        fields["add_pooler"] = True  # as HF BertModel; `load` sets it from the checkpoint
        fields.update(overrides)
        return cls(**fields)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(0.02), name=name)


def _embed(num: int, features: int, name: str) -> nn.Embed:
    return nn.Embed(num, features, embedding_init=nn.initializers.normal(0.02), name=name)


def _layer_norm(c: BertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")


def _dropout(module: nn.Module, x: jnp.ndarray, rate: float) -> jnp.ndarray:
    """HF's dropout sites, active only while training with a "dropout" rng."""
    if rate == 0.0 or not module.has_rng("dropout"):
        return x
    return nn.Dropout(rate, deterministic=False)(x)


def position_ids(input_ids_BxT: jnp.ndarray, c: BertConfig) -> jnp.ndarray:
    """BERT counts 0..T-1; RoBERTa counts real tokens from padding_idx+1, pads get padding_idx."""
    B, T = input_ids_BxT.shape
    if c.model_type == "bert":
        return jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
    real_BxT = (input_ids_BxT != c.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real_BxT, axis=1) * real_BxT + c.pad_token_id


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids_BxT, token_type_ids_BxT):
        c = self.config
        words_BxTxD = _embed(c.vocab_size, c.hidden_size, "word_embeddings")(input_ids_BxT)
        pos = _embed(c.max_position_embeddings, c.hidden_size, "position_embeddings")
        types = _embed(c.type_vocab_size, c.hidden_size, "token_type_embeddings")
        h_BxTxD = words_BxTxD + pos(position_ids(input_ids_BxT, c)) + types(token_type_ids_BxT)
        return _dropout(self, _layer_norm(c)(h_BxTxD), c.hidden_dropout_prob)


class SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxD, mask_BxT):
        c = self.config
        B, T, D = x_BxTxD.shape
        H = c.num_attention_heads
        K = D // H
        q_BxTxHxK = tag(_dense(D, "query")(x_BxTxD), "query_proj").reshape(B, T, H, K)
        k_BxSxHxK = tag(_dense(D, "key")(x_BxTxD), "key_proj").reshape(B, T, H, K)
        v_BxSxHxK = tag(_dense(D, "value")(x_BxTxD), "value_proj").reshape(B, T, H, K)
        # Head-major operands, the scale on q (not on the T×S scores) and an additive mask:
        # XLA:CPU then runs plain batched matmuls with no select in the backward pass.
        q_BxHxTxK = (q_BxTxHxK * jnp.asarray(K**-0.5, q_BxTxHxK.dtype)).transpose(0, 2, 1, 3)
        k_BxHxKxS = k_BxSxHxK.transpose(0, 2, 3, 1)
        v_BxHxSxK = v_BxSxHxK.transpose(0, 2, 1, 3)
        bias_Bx1x1xS = jnp.where(mask_BxT > 0, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        scores_BxHxTxS = jnp.matmul(q_BxHxTxK, k_BxHxKxS).astype(jnp.float32) + bias_Bx1x1xS
        probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(v_BxSxHxK.dtype)
        probs_BxHxTxS = _dropout(self, probs_BxHxTxS, c.attention_probs_dropout_prob)
        out_BxTxHxK = jnp.matmul(probs_BxHxTxS, v_BxHxSxK).transpose(0, 2, 1, 3)
        return tag(out_BxTxHxK.reshape(B, T, D), "attention_out")


class AddNorm(nn.Module):
    """HF's "output" blocks: LayerNorm(residual + dense(x))."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxTxF, residual_BxTxD):
        dense_BxTxD = _dense(self.config.hidden_size, "dense")(x_BxTxF)
        dense_BxTxD = _dropout(self, dense_BxTxD, self.config.hidden_dropout_prob)
        return _layer_norm(self.config)(residual_BxTxD + dense_BxTxD)


class Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h_BxTxD, mask_BxT):
        ctx_BxTxD = SelfAttention(self.config, name="self")(h_BxTxD, mask_BxT)
        return AddNorm(self.config, name="output")(ctx_BxTxD, h_BxTxD)


class Intermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h_BxTxD):
        c = self.config
        up_BxTxF = _dense(c.intermediate_size, "dense")(h_BxTxD)
        return jax.nn.gelu(up_BxTxF, approximate=_ACTS[c.hidden_act])


class Layer(nn.Module):
    """Post-norm block. Signature (carry, broadcast) -> (carry, None) so nn.scan can stack it."""

    config: BertConfig

    @nn.compact
    def __call__(self, h_BxTxD, mask_BxT):
        c = self.config
        h_BxTxD = Attention(c, name="attention")(h_BxTxD, mask_BxT)
        up_BxTxF = Intermediate(c, name="intermediate")(h_BxTxD)
        return AddNorm(c, name="output")(up_BxTxF, h_BxTxD), None


class Encoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h_BxTxD, mask_BxT):
        c = self.config
        layer_cls = wrap_layer(Layer, c.remat, c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, in_axes=nn.broadcast,
                            split_rngs={"params": True, "dropout": True}, length=c.num_hidden_layers)
            return stack(c, name="layer")(h_BxTxD, mask_BxT)[0]
        for i in range(c.num_hidden_layers):
            h_BxTxD, _ = layer_cls(c, name=f"layer_{i}")(h_BxTxD, mask_BxT)
        return h_BxTxD


class Pooler(nn.Module):
    """HF's pooler: tanh(dense(first token)); used by BERT's sequence classifiers."""

    config: BertConfig

    @nn.compact
    def __call__(self, h_BxTxD):
        return jnp.tanh(_dense(self.config.hidden_size, "dense")(h_BxTxD[:, 0, :]))


class BertModel(nn.Module):
    """Returns last hidden states [B,T,D]; the pooler (if any) is only used by `pooled`."""

    config: BertConfig

    def setup(self):
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)
        if self.config.add_pooler:
            self.pooler = Pooler(self.config)

    def __call__(
        self,
        input_ids_BxT: jnp.ndarray,
        attention_mask_BxT: jnp.ndarray | None = None,
        token_type_ids_BxT: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if token_type_ids_BxT is None:
            token_type_ids_BxT = jnp.zeros(input_ids_BxT.shape, jnp.int32)
        h_BxTxD = self.embeddings(input_ids_BxT, token_type_ids_BxT)
        h_BxTxD = self.encoder(h_BxTxD, attention_mask_BxT)
        if self.config.add_pooler and self.is_initializing():
            self.pooled(h_BxTxD)  # create the pooler params
        return h_BxTxD

    def pooled(self, h_BxTxD: jnp.ndarray) -> jnp.ndarray:
        """[B,D] pooler output, for use via `apply(..., method=BertModel.pooled)`."""
        return self.pooler(h_BxTxD)


def mean_pool(h_BxTxD: jnp.ndarray, mask_BxT: jnp.ndarray | None = None) -> jnp.ndarray:
    """Sentence embedding [B,D]: mean of token states over real (mask=1) tokens."""
    if mask_BxT is None:
        return jnp.mean(h_BxTxD, axis=1)
    w_BxTx1 = mask_BxT.astype(h_BxTxD.dtype)[:, :, None]
    total_BxD = jnp.sum(h_BxTxD * w_BxTx1, axis=1)
    count_Bx1 = jnp.maximum(jnp.sum(w_BxTx1, axis=1), 1e-9)
    return total_BxD / count_Bx1


class ClassificationHead(nn.Module):
    """Optional task head: pooled [B,D] -> [B,num_labels] logits; trained from scratch."""

    num_labels: int
    hidden_size: int

    @nn.compact
    def __call__(self, pooled_BxD: jnp.ndarray) -> jnp.ndarray:
        h_BxD = jnp.tanh(_dense(self.hidden_size, "dense")(pooled_BxD))
        return _dense(self.num_labels, "out_proj")(h_BxD)
