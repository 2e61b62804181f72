"""The `causal_lm` task: next-token prediction where both learning and forgetting are measured.

A small Llama-family decoder is pretrained from scratch on a source corpus (model.path "": made
here with `from_config`; see lora_jax/pretrain.py), then adapted (LoRA or full) to a target
corpus (model.path: the exported base). Every evaluation reports held-out loss and perplexity
on both: target (learning) and source (forgetting). Data: lora_jax/tasks/corpora.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.models.lm_loss import next_token_fn
from lora_jax.paths import flat_paths, nest
from lora_jax.sharding import to_device
from lora_jax.tasks import corpora
from lora_jax.tasks.task import Task, model_options

ROLES = ("target", "source")


def hf_config(c: Any) -> dict[str, Any]:
    """The HF config.json of the from-scratch base described by the `causal_lm` config block."""
    if c.hidden_size % c.heads:
        raise LoraError(f"causal_lm.hidden_size={c.hidden_size} is not divisible by heads={c.heads}")
    llama = _llama_config(c)
    family = c.get("family", "llama")
    if family == "llama":
        return llama
    head_dim = c.hidden_size // c.heads
    if family == "qwen3":
        return dict(llama, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=head_dim)
    if family == "gemma3":  # local layers see a quarter window; every second layer is global
        gemma = {k: v for k, v in llama.items() if k != "hidden_act"}
        return dict(gemma, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                    hidden_activation="gelu_pytorch_tanh", head_dim=head_dim,
                    query_pre_attn_scalar=head_dim, sliding_window=max(c.seq_len // 4, 1),
                    layer_types=["full_attention" if i % 2 else "sliding_attention"
                                 for i in range(c.layers)],
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    if family == "qwen3_moe":  # every MLP: 4 experts of intermediate_size, 2 routed per token
        return dict(llama, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                    head_dim=head_dim, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                    moe_intermediate_size=c.intermediate_size)
    raise LoraError(f"causal_lm.family={family!r}; expected one of 'llama', 'qwen3', 'gemma3', "
                    "'qwen3_moe'")


def _llama_config(c: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": corpora.BYTE_VOCAB, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.heads,
        "max_position_embeddings": c.seq_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 256, "eos_token_id": 256,
    }


def next_token_loss(logits_BxTxV: jax.Array, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats/token) of predicting token t+1 from 0..t, padding masked out."""
    logp_BxSxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    nll_BxS = -jnp.take_along_axis(logp_BxSxV, ids_BxT[:, 1:, None], axis=-1)[..., 0]
    w_BxS = (mask_BxT[:, 1:] * mask_BxT[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll_BxS * w_BxS) / jnp.maximum(jnp.sum(w_BxS), 1.0)


def shifted_targets(ids_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(target_ids, weight), both [B,T]: position t predicts token t+1, weighted 1 where both are
    real tokens; the last position has no next token and weighs 0."""
    targets_BxT = jnp.concatenate([ids_BxT[:, 1:], ids_BxT[:, -1:]], axis=1)
    pairs_BxS = (mask_BxT[:, 1:] * mask_BxT[:, :-1]).astype(jnp.float32)
    w_BxT = jnp.concatenate([pairs_BxS, jnp.zeros_like(pairs_BxS[:, :1])], axis=1)
    return targets_BxT, w_BxT


def training_loss(model: Callable, batch: dict) -> tuple[jax.Array, dict]:
    """`next_token_loss` without [B,T,V] float32 logits: `model` is the task's fn with trained
    weights, and (ids, mask, targets, True) asks it for chunked log-likelihoods (models/lm_loss.py)."""
    targets_BxT, w_BxT = shifted_targets(batch["input_ids"], batch["attention_mask"])
    logp_BxT = model(batch["input_ids"], batch["attention_mask"], targets_BxT, True)
    value = -jnp.sum(logp_BxT * w_BxT) / jnp.maximum(jnp.sum(w_BxT), 1.0)
    return value, {"ppl": jnp.exp(value)}


def _nll_sum(logits_BxTxV: np.ndarray, ids_BxT: np.ndarray) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) on the host, for full (unpadded) windows."""
    z_BxSxV = logits_BxTxV[:, :-1].astype(np.float64)
    m_BxSx1 = z_BxSxV.max(axis=-1, keepdims=True)
    lse_BxS = m_BxSx1[..., 0] + np.log(np.exp(z_BxSxV - m_BxSx1).sum(axis=-1))
    picked_BxS = np.take_along_axis(z_BxSxV, ids_BxT[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return float(np.sum(lse_BxS - picked_BxS)), int(picked_BxS.size)


def _missing_base(config: Any) -> str:
    return (f"no pretrained causal_lm base at {config.model.path}; make it first with: "
            f"python -m experiments.pretrain --config={config.causal_lm.base_config}")


def _model(config: Any, placer: Callable):
    """(LoadedModel with placed params, tokenizer, source): the exported base, or a fresh random one."""
    import dataclasses

    from lora_jax.models import from_config, load

    c = config.causal_lm
    dtype = jnp.dtype(config.model.dtype)
    if config.model.path:
        if not os.path.isfile(os.path.join(os.path.expanduser(config.model.path), "config.json")):
            raise LoraError(_missing_base(config))
        model = load(config.model.path, dtype=dtype, shardings=placer, **model_options(config))
        if model.family != "llama" or model.tokenizer is None:
            raise LoraError(f"causal_lm needs a Llama-family decoder with tokenizer.json; "
                            f"{config.model.path} is {model.family}, "
                            f"tokenizer: {model.tokenizer is not None}")
        return model, model.tokenizer, model.source
    hf = hf_config(c)
    model = from_config(hf, seed=config.seed, dtype=dtype, **model_options(config))
    params = nest({p: to_device(np.asarray(w), placer(p, w.shape)) for p, w in flat_paths(model.params)})
    digest = hashlib.sha256(json.dumps(hf, sort_keys=True).encode()).hexdigest()[:12]
    return (dataclasses.replace(model, params=params), corpora.byte_tokenizer(),
            f"scratch:{digest}:seed{config.seed}")


def build(config: Any, placer: Callable, workdir: str) -> Task:
    """Train on `causal_lm.train_on`'s train split; evaluate on both corpora's held-out splits."""
    del workdir
    c = config.causal_lm
    if c.train_on not in ROLES:
        raise LoraError(f"causal_lm.train_on={c.train_on!r}; expected one of {ROLES}")
    model, tok, source = _model(config, placer)
    names = {"target": c.target, "source": c.source}
    train_stream, held = None, {}
    for role in ROLES:
        train_docs, held_docs = corpora.split(corpora.documents(names[role]), c.holdout)
        if not held_docs:
            raise LoraError(f"causal_lm.holdout={c.holdout} holds out no document of {names[role]!r}")
        held[role] = corpora.eval_windows(corpora.token_stream(tok, held_docs), c.seq_len, c.eval_windows)
        if role == c.train_on:
            train_stream = corpora.token_stream(tok, train_docs)
    n_windows = corpora.windows_per_epoch(train_stream, c.seq_len)
    if n_windows < config.batch_size:
        raise LoraError(f"corpus {names[c.train_on]!r} has {n_windows} training windows of "
                        f"{c.seq_len} tokens, fewer than batch_size {config.batch_size}")

    def evaluate(forward, trainable) -> dict[str, float]:
        del trainable
        out = {}
        for role, ids_NxT in held.items():
            total, count = 0.0, 0
            for i in range(0, len(ids_NxT), c.eval_batch):
                ids_BxT = ids_NxT[i:i + c.eval_batch]
                nll, n = _nll_sum(np.asarray(forward(ids_BxT, np.ones_like(ids_BxT))), ids_BxT)
                total, count = total + nll, count + n
            out[f"{role}_loss"] = total / count
            out[f"{role}_ppl"] = float(np.exp(total / count))
        return out

    return Task(
        fn=next_token_fn(model), params=model.params, source=source,
        inputs=lambda b: (b["input_ids"], b["attention_mask"]), loss=training_loss,
        batches=lambda position: corpora.iterate_windows(
            train_stream, c.seq_len, config.batch_size, config.seed, position),
        evaluate=evaluate, train_examples=n_windows, tokenizer=tok, hf_model=model,
        compiler_options=model.compiler_options,
    )
