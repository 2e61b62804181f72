"""The real lora_jax train step (trainer's pieces) on MiniLM and on random Llama-family models.

Built exactly as lora_jax/trainer.py does it -- `make_optimizer`, `make_train_step`,
`model_apply`, `TrainState`, `jax.jit(..., donate_argnums=0)` -- on one device, so what is
timed here is what training runs. Each bench owns its own copy of the params because the state
(frozen weights included) is donated on every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from benchmarks.common import MINILM, block, compiled_costs, optimizer_config, tree_bytes
from lora_jax.models import from_config, load
from lora_jax.tasks.retrieval import DEFAULT_TEMPERATURE, info_nce_loss, l2_normalize, mean_pool
from lora_jax.train_step import TrainState, make_optimizer, make_train_step, model_apply

PyTree = Any


@dataclasses.dataclass
class Bench:
    """A compiled train step with its (donated, so replaced every call) state."""

    name: str
    compiled: Any
    state: TrainState
    batch: dict
    info: dict

    def run(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch)
        block(metrics)


@dataclasses.dataclass
class Model:
    """A forward `fn(params, ids, mask)`, its params, a loss over a batch and shape facts."""

    name: str
    fn: Callable
    params: PyTree
    loss: Callable
    batch: dict
    inputs: Callable[[dict], tuple]
    seqs: list[tuple[int, int]]  # (batch, tokens) of every forward the loss makes
    layers: int
    attn_dim: int
    hf_config: dict
    compiler_options: dict = dataclasses.field(default_factory=dict)  # the project's, per family


def code_search_loss(run: Callable, batch: dict) -> tuple[jax.Array, dict]:
    """lora_jax/tasks/code_search.py's loss: mean-pooled, normalised, InfoNCE at T=0.05."""
    q = l2_normalize(mean_pool(run(batch["query_ids"], batch["query_mask"]), batch["query_mask"]))
    k = l2_normalize(mean_pool(run(batch["code_ids"], batch["code_mask"]), batch["code_mask"]))
    value = info_nce_loss(q, k, DEFAULT_TEMPERATURE)
    return value, {"infonce": value}


def lm_loss(run: Callable, batch: dict) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over the whole (unpadded) window."""
    logits_BxTxV = run(batch["ids"], batch["mask"]).astype(jnp.float32)
    logp_BxSxV = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
    nll_BxS = -jnp.take_along_axis(logp_BxSxV, batch["ids"][:, 1:, None], axis=-1)[..., 0]
    value = jnp.mean(nll_BxS)
    return value, {"nll": value}


def retrieval_batch(batch: int, query_len: int, code_len: int, vocab: int, seed: int = 0) -> dict:
    """Random token ids of the code_search shapes, every token real (no padding)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, n in (("query", query_len), ("code", code_len)):
        out[f"{key}_ids"] = rng.integers(1000, vocab, (batch, n)).astype(np.int32)
        out[f"{key}_mask"] = np.ones((batch, n), np.int32)
    return out


def minilm(batch: int = 32, query_len: int = 64, code_len: int = 128, path: str = MINILM,
           **options: Any) -> Model:
    """MiniLM on a retrieval batch; `options`: load's scan_layers, remat, attention."""
    m = load(path, **options)
    c = m.config
    data = retrieval_batch(batch, query_len, code_len, c.vocab_size)
    return Model("minilm", m.fn, m.params, code_search_loss, data,
                 lambda b: (b["query_ids"], b["query_mask"]),
                 [(batch, query_len), (batch, code_len)], c.num_hidden_layers, c.hidden_size,
                 m.hf_config, m.compiler_options)


def llama_config(width: int, layers: int = 4, vocab: int = 8192) -> dict:
    """A Llama-style config dict: head dim 64, SwiGLU width ~8/3·d rounded to 64, untied head."""
    heads = max(1, width // 64)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": width, "intermediate_size": max(64, int(8 * width / 3) // 64 * 64),
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}


def llama(width: int, batch: int = 4, seq: int = 128, layers: int = 4, vocab: int = 8192,
          **options: Any) -> Model:
    hf = llama_config(width, layers, vocab)
    m = from_config(hf, seed=0, **options)
    rng = np.random.default_rng(0)
    data = {"ids": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
            "mask": np.ones((batch, seq), np.int32)}
    return Model(f"llama-d{width}", m.fn, m.params, lm_loss, data, lambda b: (b["ids"], b["mask"]),
                 [(batch, seq)], layers, m.config.num_attention_heads * m.config.head_dim, hf,
                 m.compiler_options)


def analytic_flops(model: Model, adapters: PyTree | None) -> dict:
    """Matmul FLOPs by hand: 2 per multiply-add over every Dense kernel and attention product.

    Full fine-tuning = 3x forward (activation + weight gradients); LoRA = forward + activation
    gradients of the linear layers (2x) + attention's full backward (3x) + 6·tokens·adapter size.
    """
    flat = jax.tree_util.tree_leaves_with_path(model.params)
    lin = sum(int(np.prod(x.shape)) for kp, x in flat if jax.tree_util.keystr(kp).endswith("['kernel']"))
    tokens = sum(b * t for b, t in model.seqs)
    lin_fwd = 2.0 * tokens * lin
    att_fwd = sum(4.0 * b * t * t * model.attn_dim * model.layers for b, t in model.seqs)
    adp = lora_jax.count_params(adapters) if adapters is not None else 0
    return {"forward": lin_fwd + att_fwd, "full": 3 * (lin_fwd + att_fwd),
            "lora": 2 * lin_fwd + 3 * att_fwd + 6.0 * tokens * adp, "tokens": tokens}


def copy_tree(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def build(model: Model, method: str, spec: lora_jax.LoraSpec | None = None, name: str = "") -> Bench:
    """Compile the trainer's step for `method` ("lora" | "full") and record its static costs."""
    params = copy_tree(model.params)
    batch = {k: jnp.asarray(v) for k, v in model.batch.items()}
    if method == "lora":
        adapters = lora_jax.init(jax.random.key(1), model.fn, params, *model.inputs(batch), spec=spec)
        trainable, frozen = {"adapters": adapters, "extra": {}}, params
    else:
        adapters, trainable, frozen = None, params, {}
    tx, schedule = make_optimizer(optimizer_config(), 1000)
    opt_state = jax.jit(tx.init)(trainable)
    state = TrainState(step=jnp.int32(0), trainable=trainable, frozen=frozen, opt_state=opt_state,
                       rng=jax.random.key(2))
    step = make_train_step(model_apply(method, model.fn), model.loss, tx, schedule, 1, use_rng=False)
    compiled = jax.jit(step, donate_argnums=0, compiler_options=model.compiler_options
                       ).lower(state, batch).compile()
    info = {"method": method, **compiled_costs(compiled),
            "trainable_bytes": tree_bytes(trainable), "base_bytes": tree_bytes(model.params),
            "optimizer_bytes": tree_bytes(opt_state),
            "analytic_flops": analytic_flops(model, adapters)[method]}
    if adapters is not None:
        info["adapter_bytes"] = tree_bytes(adapters)
        info["adapter_params"] = lora_jax.count_params(adapters)
    return Bench(name or f"{model.name}/{method}", compiled, state, batch, info)


def lora_spec(targets: str, rank: int, alpha: float | None = None) -> lora_jax.LoraSpec:
    return lora_jax.LoraSpec(targets=targets, rank=rank, alpha=2.0 * rank if alpha is None else alpha)


BERT_QV = r".*/(query|value)/kernel"
LLAMA_QV = r".*/(q_proj|v_proj)/kernel"
LLAMA_ALL = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
