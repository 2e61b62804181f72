"""Small models of every kind the transform must handle, each as (fn, params, args, targets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass
class Case:
    fn: Callable
    params: Any
    args: tuple
    targets: str


class Attention(nn.Module):
    heads: int = 2
    head_dim: int = 4

    @nn.compact
    def __call__(self, x_BxTxD):
        d = x_BxTxD.shape[-1]
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x_BxTxD)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(x_BxTxD)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(x_BxTxD)
        logits_BxHxTxT = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(self.head_dim)
        attn = jax.nn.softmax(logits_BxHxTxT, axis=-1)
        o_BxTxHxK = jnp.einsum("bhts,bshd->bthd", attn, v)
        return nn.DenseGeneral(d, axis=(-2, -1), name="out")(o_BxTxHxK)


class TransformerBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        x = x + Attention()(nn.LayerNorm()(x))
        h = nn.Dense(16, name="mlp_in")(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(jax.nn.gelu(h)), None


def linen_block() -> Case:
    m = TransformerBlock()
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    p = m.init(jax.random.key(1), x)
    return Case(lambda p, x: m.apply(p, x)[0], p, (x,), r".*/(query|key|value|out|mlp_in|mlp_out)/kernel")


class ScannedStack(nn.Module):
    layers: int = 4

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(TransformerBlock), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=self.layers)
        x, _ = stack(name="layers")(x, None)
        return x


def scanned() -> Case:
    m = ScannedStack()
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    p = m.init(jax.random.key(1), x)
    return Case(lambda p, x: m.apply(p, x), p, (x,), r".*/(query|value|out|mlp_in)/kernel")


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def nnx_mlp() -> Case:
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (4, 6))
    return Case(lambda s, x: nnx.merge(graphdef, s)(x), state, (x,), r"fc\d/kernel")


def plain_mlp() -> Case:
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = [(5, 12), (12, 12), (12, 2)]
    p = {f"w{i}": jax.random.normal(k, s) / jnp.sqrt(s[0]) for i, (k, s) in enumerate(zip(keys, sizes))}

    def fn(p, x):
        x = jnp.tanh(x @ p["w0"])
        x = jnp.tanh(x @ p["w1"])
        return x @ p["w2"]

    x = jax.random.normal(jax.random.key(3), (7, 5))
    return Case(fn, p, (x,), r"w\d")


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = jax.nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(x))
        return nn.Dense(4, name="head")(x.mean(axis=(1, 2)))


def conv_net() -> Case:
    m = ConvNet()
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    p = m.init(jax.random.key(1), x)
    return Case(lambda p, x: m.apply(p, x), p, (x,), r".*/(conv1|conv2|head)/kernel")


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(20, 8, name="embed")
        x = embed(ids)
        x = x + nn.Dense(8, name="mix")(jnp.tanh(x))
        return embed.attend(x)


def tied_embedding() -> Case:
    m = TiedLM()
    ids = jnp.arange(12).reshape(2, 6) % 20
    p = m.init(jax.random.key(1), ids)
    return Case(lambda p, ids: m.apply(p, ids), p, (ids,), r".*/(embedding|mix/kernel)")


CASES = {
    "linen_block": linen_block,
    "nnx_mlp": nnx_mlp,
    "plain_mlp": plain_mlp,
    "scanned": scanned,
    "conv_net": conv_net,
    "tied_embedding": tied_embedding,
}


def randomize(adapters: Any, seed: int = 0, scale: float = 0.3) -> Any:
    """Adapters with random A and B (B starts at zero after init, which hides mistakes)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def assert_match_on_real_tokens(ours: Any, theirs: np.ndarray, mask: np.ndarray, atol: float) -> None:
    """Outputs agree at the unpadded positions, and those are not trivially small."""
    real = mask.astype(bool)
    assert np.abs(theirs[real]).max() > 0.5
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=atol, rtol=0)
