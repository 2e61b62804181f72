"""The MiniLM LoRA step written by hand in Flax: the LoRA branch coded into query/value Dense.

This is what lora_jax's transform should cost no more than. Module names mirror
lora_jax/models/bert.py, so the same MiniLM weights load by key; only `lora_a`/`lora_b` are
trained, with the same optimizer, loss and batch as the real step. No lora_jax.apply anywhere.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from benchmarks.common import compiled_costs, optimizer_config, tree_bytes
from benchmarks.steps import Bench, Model, copy_tree
from lora_jax.train_step import make_optimizer


def _mm(spec: str, x: jax.Array, w: jax.Array, dot_dtype: Any) -> jax.Array:
    """einsum in fp32, or with operands in `dot_dtype` and fp32 accumulation and output: the
    form XLA:CPU sends to the AMX/avx512_bf16 kernels (bf16 in -> bf16 out does not)."""
    if dot_dtype is None:
        return jnp.einsum(spec, x, w)
    return jnp.einsum(spec, x.astype(dot_dtype), w.astype(dot_dtype),
                      preferred_element_type=jnp.float32)


class LoraDense(nn.Module):
    """y = x·W + b + (α/r)·(x·A)·B, A kaiming-uniform, B zero (PEFT's layout and init)."""

    features: int
    rank: int
    alpha: float
    dot_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(0.02), (d_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        bound = 1.0 / d_in**0.5
        a = self.param("lora_a", nn.initializers.uniform(2 * bound), (d_in, self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        y = _mm("btd,df->btf", x, kernel, self.dot_dtype) + bias[None, None, :]
        return y + (self.alpha / self.rank) * ((x @ a) @ b)


class Dense(nn.Module):
    features: int
    dot_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return _mm("btd,df->btf", x, kernel, self.dot_dtype) + bias[None, None, :]


class Block(nn.Module):
    """One post-norm BERT layer with params at HF-mirroring paths."""

    hidden: int
    heads: int
    inter: int
    rank: int
    alpha: float
    eps: float
    dot_dtype: Any = None

    @nn.compact
    def __call__(self, h, mask):
        B, T, D = h.shape
        H, K = self.heads, D // self.heads
        dt = self.dot_dtype
        ln = lambda name: nn.LayerNorm(epsilon=self.eps, name=name)
        lora = lambda name: LoraDense(D, self.rank, self.alpha, dt, name=f"attention/self/{name}")
        q = lora("query")(h).reshape(B, T, H, K)
        k = Dense(D, dt, name="attention/self/key")(h).reshape(B, T, H, K)
        v = lora("value")(h).reshape(B, T, H, K)
        s = _mm("bthk,bshk->bhts", q, k, dt) / jnp.sqrt(jnp.float32(K))
        s = jnp.where((mask > 0)[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        ctx = _mm("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1), v, dt).reshape(B, T, D)
        h = ln("attention/output/LayerNorm")(h + Dense(D, dt, name="attention/output/dense")(ctx))
        up = jax.nn.gelu(Dense(self.inter, dt, name="intermediate/dense")(h), approximate=False)
        return ln("output/LayerNorm")(h + Dense(D, dt, name="output/dense")(up))


class LoraBert(nn.Module):
    cfg: Any
    rank: int
    alpha: float
    dot_dtype: Any = None

    @nn.compact
    def __call__(self, ids, mask):
        c = self.cfg
        B, T = ids.shape
        emb = lambda n, name: nn.Embed(n, c.hidden_size, name=f"embeddings/{name}")
        pos = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
        h = (emb(c.vocab_size, "word_embeddings")(ids) + emb(c.max_position_embeddings,
             "position_embeddings")(pos) + emb(c.type_vocab_size, "token_type_embeddings")(
             jnp.zeros_like(ids)))
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings/LayerNorm")(h)
        for i in range(c.num_hidden_layers):
            h = Block(c.hidden_size, c.num_attention_heads, c.intermediate_size, self.rank,
                      self.alpha, c.layer_norm_eps, self.dot_dtype, name=f"encoder/layer_{i}")(h, mask)
        return h


def _flat(tree: Any) -> dict:
    """Flatten with "/"-joined keys: "encoder/layer_0" + "attention/self/query" + "kernel" gives
    the same path string as lora_jax's nested BertModel params."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def build(model: Model, config: Any, rank: int = 16, alpha: float = 32.0,
          dot_dtype: Any = None) -> Bench:
    """The hand-written step: grads w.r.t. lora_a/lora_b only, the trainer's optimizer, donated.

    `dot_dtype=jnp.bfloat16` runs the frozen matmuls in bf16 with fp32 accumulation (weights stay
    fp32 in memory): a probe of what bf16 compute would buy, not a like-for-like baseline.
    """
    module = LoraBert(config, rank, alpha, dot_dtype)
    batch = {k: jnp.asarray(v) for k, v in model.batch.items()}
    init = jax.jit(module.init)(jax.random.key(1), batch["query_ids"], batch["query_mask"])
    loaded = _flat(copy_tree(model.params))
    flat = {k: loaded.get(k, v) for k, v in _flat(init).items()}  # real weights where they exist
    trainable = {k: v for k, v in flat.items() if k.endswith(("lora_a", "lora_b"))}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    missing = [k for k in frozen if k not in loaded]
    if missing:
        raise ValueError(f"hand-written BERT has params the checkpoint lacks: {missing[:3]}")

    keys = {"/".join(k): k for k in traverse_util.flatten_dict(init)}

    def fwd(params_flat, ids, mask):
        return module.apply(traverse_util.unflatten_dict({keys[k]: v for k, v in params_flat.items()}),
                            ids, mask)

    tx, schedule = make_optimizer(optimizer_config(), 1000)

    def step(state, batch):
        tr, fr, opt, i = state

        def loss_of(t):
            return model.loss(lambda ids, mask: fwd({**fr, **t}, ids, mask), batch)

        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(tr)
        updates, opt = tx.update(grads, opt, tr)
        tr = jax.tree.map(jnp.add, tr, updates)
        return (tr, fr, opt, i + 1), {"loss": loss, "lr": schedule(i)}

    state = (trainable, frozen, jax.jit(tx.init)(trainable), jnp.int32(0))
    # The project's per-family XLA options, as our step gets: this compares the transform, not flags.
    compiled = jax.jit(step, donate_argnums=0, compiler_options=model.compiler_options
                       ).lower(state, batch).compile()
    info = {"method": "lora (hand-written)", **compiled_costs(compiled),
            "dot_dtype": None if dot_dtype is None else jnp.dtype(dot_dtype).name,
            "trainable_bytes": tree_bytes(trainable), "optimizer_bytes": tree_bytes(state[2])}
    return Bench("minilm/handwritten", compiled, state, batch, info)
