"""Next-token log-likelihoods without a float32 [B,T,V] logits tensor.

The plain loss forms logits [B,T,V], upcasts them to float32 and takes a log-softmax; its
gradient holds several such tensors at once (8.4 GB each at vocab 128,256 and 8x2048 tokens).
Here the LM head is applied to the final hidden states one sequence chunk at a time inside a
`lax.scan`: a chunk's logits [B,C,V] are computed in the activations' dtype with float32
accumulation, reduced to log p(target) [B,C] and dropped. Each chunk runs under
`jax.checkpoint`, so the backward recomputes one chunk's logits rather than keeping them all.

Chunks split the sequence, never the batch, so a batch-sharded step stays batch-sharded. The
head weight enters the scan as a loop constant, which the LoRA transform follows: an adapted
lm_head, or a tied embedding, still gets its factored branch inside every chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.errors import LoraError
from lora_jax.models.llama import head_weight, softcap
from lora_jax.models.precision import dot_f32_out

CHUNK_POSITIONS = 128  # sequence positions per chunk; at 8x128 and vocab 128,256: 525 MB of fp32 logits


def head_logits(h_BxCxD: jax.Array, w: jax.Array, tied: bool) -> jax.Array:
    """float32 logits [B,C,V]: h·W for an lm_head kernel [D,V], h·Eᵀ for a tied embedding [V,D].

    The product runs in the common dtype of h and W (as nn.Dense promotes) and accumulates in
    float32, so bf16 activations never round their logits to bf16."""
    dtype = jnp.result_type(h_BxCxD.dtype, w.dtype)
    contract_w = 1 if tied else 0
    dims = (((h_BxCxD.ndim - 1,), (contract_w,)), ((), ()))
    return dot_f32_out(h_BxCxD.astype(dtype), w.astype(dtype), dims)  # bf16 gradient matmuls too


def _chunk_logp(w: jax.Array, h_BxCxD: jax.Array, targets_BxC: jax.Array, tied: bool,
                cap: float | None) -> jax.Array:
    logits_BxCxV = softcap(head_logits(h_BxCxD, w, tied), cap)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    picked_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    return picked_BxC - lse_BxC


def chunked_target_logp(h_BxTxD: jax.Array, w: jax.Array, tied: bool, targets_BxT: jax.Array,
                        chunk: int = CHUNK_POSITIONS, cap: float | None = None) -> jax.Array:
    """log softmax(head(h))[target] per position, float32 [B,T], one chunk of positions at a time;
    `cap` soft-caps the logits as the model's head does (Gemma's final_logit_softcapping).

    T need not be a multiple of `chunk`: the last T % chunk positions form one extra chunk.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise LoraError(f"chunk={chunk!r}; expected a positive number of sequence positions")
    B, T, D = h_BxTxD.shape
    C = min(chunk, T)
    n, tail = divmod(T, C)
    piece = jax.checkpoint(functools.partial(_chunk_logp, tied=tied, cap=cap))

    def body(carry, xs):
        h_BxCxD, targets_BxC = xs
        return carry, piece(w, h_BxCxD, targets_BxC)

    main = n * C
    h_NxBxCxD = h_BxTxD[:, :main].reshape(B, n, C, D).swapaxes(0, 1)
    targets_NxBxC = targets_BxT[:, :main].reshape(B, n, C).swapaxes(0, 1)
    _, logp_NxBxC = jax.lax.scan(body, (), (h_NxBxCxD, targets_NxBxC))
    logp_BxT = logp_NxBxC.swapaxes(0, 1).reshape(B, main)
    if tail:
        logp_BxR = piece(w, h_BxTxD[:, main:], targets_BxT[:, main:])
        logp_BxT = jnp.concatenate([logp_BxT, logp_BxR], axis=1)
    return logp_BxT


def next_token_fn(model: Any, chunk: int = CHUNK_POSITIONS) -> Callable:
    """fn(params, input_ids, attention_mask=None, target_ids=None, chunked=False) for a Llama
    `LoadedModel`, to hand the LoRA transform (or full fine-tuning) as a task's fn.

    Without target_ids: logits [B,T,V], exactly `model.fn`. With them: float32 log p(target_ids[t]
    | input_ids[:t+1]) [B,T], from whole float32 logits (chunked=False: evaluation, unchanged) or
    chunk by chunk (chunked=True, a static Python bool: training; same value and gradient within
    float32 rounding, without [B,T,V] float32 buffers).
    """
    if model.family != "llama":
        raise LoraError(f"a chunked LM loss needs a Llama-family decoder; this model is {model.family}")

    def fn(params, input_ids_BxT, attention_mask_BxT=None, target_ids_BxT=None, chunked=False):
        if target_ids_BxT is None:
            return model.fn(params, input_ids_BxT, attention_mask_BxT)
        if not chunked:
            logits_BxTxV = model.fn(params, input_ids_BxT, attention_mask_BxT).astype(jnp.float32)
            return -optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, target_ids_BxT)
        h_BxTxD = model.module.apply(params, input_ids_BxT, attention_mask_BxT, hidden_only=True)
        w, tied = head_weight(model.config, params)
        return chunked_target_logp(h_BxTxD, w, tied, target_ids_BxT, chunk,
                                   getattr(model.config, "final_logit_softcapping", None))

    return fn
