"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral): the Llama-family layer with its MLP swapped
for a top-k routed block of SwiGLU experts.

Routing follows transformers: router logits from a bias-free Dense ("gate", [D, E]), softmax in
float32, top-k experts per token, their probabilities renormalised (always for Mixtral, with
`norm_topk_prob` for Qwen3-MoE). Tokens are then sorted by expert and each expert's weights meet
only the tokens routed to it, through `jax.lax.ragged_dot` (a grouped matmul): no dense
all-expert compute. Expert weights are 3-D, stored as transformers 5 holds them in memory
(experts/gate_up_proj [E, D, 2F] with gate then up on the last axis, experts/down_proj
[E, F, D]), so LoRA on them is a stacked adapter A [E, in, r], B [E, r, out] (lora_jax/expert_rules.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.models.decoder_config import LlamaConfig

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
_ATTENTION_OF = {"qwen3_moe": "qwen3", "mixtral": "mistral"}  # the dense family's attention


@dataclasses.dataclass(frozen=True)
class MoeConfig(LlamaConfig):
    """A decoder config whose every layer's MLP is a routed block of `num_experts` experts."""

    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise LoraError(f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                            f"1..num_experts ({self.num_experts})")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> MoeConfig:
        """Read a Qwen3-MoE or Mixtral config.json; refuse layouts the block would not follow."""
        model_type = hf.get("model_type")
        if model_type not in MOE_MODEL_TYPES:
            raise LoraError(f"model_type '{model_type}' is not a MoE decoder ({', '.join(MOE_MODEL_TYPES)})")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise LoraError(f"{model_type} with dense layers among the MoE ones (mlp_only_layers="
                            f"{hf.get('mlp_only_layers')}, decoder_sparse_step="
                            f"{hf.get('decoder_sparse_step')}) is not supported; every layer must be MoE")
        if hf.get("router_jitter_noise"):
            raise LoraError(f"router_jitter_noise={hf['router_jitter_noise']} is not supported (only 0)")
        base = LlamaConfig.from_hf({**hf, "model_type": _ATTENTION_OF[model_type]})
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaConfig)}
        qwen = model_type == "qwen3_moe"
        fields.update(
            model_type=model_type,
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            moe_intermediate_size=hf["moe_intermediate_size"] if qwen else hf["intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if qwen else True,
        )
        fields.update(overrides)
        return cls(**fields)


def is_moe(config: Any) -> bool:
    return isinstance(config, MoeConfig)


class Experts(nn.Module):
    """E SwiGLU experts applied to tokens already sorted by expert (`group_sizes_E` per expert)."""

    config: MoeConfig

    @nn.compact
    def __call__(self, x_MxD: jnp.ndarray, group_sizes_E: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        E, D, F = c.num_experts, c.hidden_size, c.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        gate_up_ExDx2F = self.param("gate_up_proj", init, (E, D, 2 * F), jnp.float32)
        down_ExFxD = self.param("down_proj", init, (E, F, D), jnp.float32)
        dtype = jnp.result_type(x_MxD.dtype, gate_up_ExDx2F.dtype)
        h_Mx2F = jax.lax.ragged_dot(x_MxD.astype(dtype), gate_up_ExDx2F.astype(dtype), group_sizes_E)
        gate_MxF, up_MxF = jnp.split(h_Mx2F, 2, axis=-1)
        act_MxF = (nn.silu(gate_MxF) * up_MxF).astype(dtype)
        return jax.lax.ragged_dot(act_MxF, down_ExFxD.astype(dtype), group_sizes_E)


class MoeBlock(nn.Module):
    """Router + experts: each token's output is the routing-weighted sum of its top-k experts'."""

    config: MoeConfig

    @nn.compact
    def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        B, T, D = x_BxTxD.shape
        E, K = c.num_experts, c.num_experts_per_tok
        # The router sees [B,T,D] (a mixed-adapter batch keeps its example axis there).
        logits_BxTxE = nn.Dense(E, use_bias=False, kernel_init=nn.initializers.normal(0.02),
                                name="gate")(x_BxTxD)
        probs_BxTxE = jax.nn.softmax(logits_BxTxE.astype(jnp.float32), axis=-1)
        top_p_BxTxK, top_e_BxTxK = jax.lax.top_k(probs_BxTxE, K)
        if c.norm_topk_prob:
            top_p_BxTxK = top_p_BxTxK / jnp.sum(top_p_BxTxK, axis=-1, keepdims=True)
        if c.model_type == "qwen3_moe":  # Qwen3-MoE weighs in the logits' dtype, Mixtral in f32
            top_p_BxTxK = top_p_BxTxK.astype(logits_BxTxE.dtype)
        # Sort the N*K (token, expert) pairs by expert: expert e's tokens are one contiguous run.
        expert_M = top_e_BxTxK.reshape(-1)
        order_M = jnp.argsort(expert_M, stable=True)
        group_sizes_E = jnp.bincount(expert_M, length=E).astype(jnp.int32)
        x_NxD = x_BxTxD.reshape(B * T, D)
        y_MxD = Experts(c, name="experts")(x_NxD[order_M // K], group_sizes_E)
        y_NxKxD = y_MxD[jnp.argsort(order_M)].reshape(B * T, K, D)
        weighted_NxKxD = (y_NxKxD * top_p_BxTxK.reshape(B * T, K, 1)).astype(x_BxTxD.dtype)
        return jnp.sum(weighted_NxKxD, axis=1).reshape(B, T, D)
