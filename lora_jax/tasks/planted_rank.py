"""planted_rank: a teacher/student task whose answer is known.

The teacher is a fixed random tanh MLP plus a planted update of rank k on chosen weights; the
student starts from the same random MLP (the base) and learns through LoRA (or full fine-tuning)
from the teacher's outputs on fresh Gaussian inputs. With r >= k the student can match the teacher
and its ΔW should span the planted subspace; with r < k it cannot.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import adapter_items
from lora_jax.analysis import subspace_overlap
from lora_jax.paths import flat_paths, nest
from lora_jax.sharding import to_device
from lora_jax.tasks.task import Task
from lora_jax.trainable import adapters_of


def mlp_fn(params: dict, x_BxD: jax.Array) -> jax.Array:
    n = len(params)
    for i in range(n):
        layer = params[f"layers_{i}"]
        x_BxD = x_BxD @ layer["kernel"] + layer["bias"][None, :]
        if i < n - 1:
            x_BxD = jnp.tanh(x_BxD)
    return x_BxD


def base_params(width: int, layers: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"layers_{i}": {
            "kernel": (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
            "bias": (0.1 * rng.standard_normal(width)).astype(np.float32),
        }
        for i in range(layers)
    }


def planted_updates(params: dict, pattern: str, k: int, norm: float, seed: int) -> dict[str, np.ndarray]:
    """{path: ΔW} of rank k and Frobenius norm `norm` for each weight matching `pattern`."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for path, w in flat_paths(params):
        if re.fullmatch(pattern, path):
            u, _ = np.linalg.qr(rng.standard_normal((w.shape[0], k)))
            v, _ = np.linalg.qr(rng.standard_normal((w.shape[1], k)))
            out[path] = (norm / np.sqrt(k) * u @ v.T).astype(np.float32)
    return out


def _teacher(params: dict, planted: dict[str, np.ndarray]) -> dict:
    flat = dict(flat_paths(params))
    return nest({p: w + planted.get(p, 0.0) for p, w in flat.items()})


def _np_forward(params: dict, x: np.ndarray) -> np.ndarray:
    return np.asarray(mlp_fn(jax.tree.map(jnp.asarray, params), jnp.asarray(x)))


def build(config: Any, placer: Callable, workdir: str) -> Task:
    del workdir
    c = config.planted_rank
    host = base_params(c.width, c.layers, config.seed)
    planted = planted_updates(host, c.planted, c.planted_k, c.planted_norm, config.seed)
    teacher = _teacher(host, planted)
    dtype = jnp.dtype(config.model.dtype)
    params = nest({p: to_device(np.asarray(w, dtype), placer(p, w.shape)) for p, w in flat_paths(host)})
    eval_x = np.random.default_rng([config.seed, 99]).standard_normal((c.eval_examples, c.width))
    eval_x = eval_x.astype(np.float32)
    eval_y = _np_forward(teacher, eval_x)

    def batches(position: int) -> Iterator[dict[str, np.ndarray]]:
        while True:  # batch i is a pure function of (seed, i): resumable from a position
            x = np.random.default_rng([config.seed, 7, position]).standard_normal(
                (config.batch_size, c.width)).astype(np.float32)
            yield {"x": x, "y": _np_forward(teacher, x)}
            position += 1

    def loss(model, batch):
        err = model(batch["x"]).astype(jnp.float32) - batch["y"]
        mse = jnp.mean(err**2)
        return mse, {"mse": mse}

    def evaluate(forward, trainable) -> dict[str, float]:
        pred = forward(eval_x)
        res = {"mse": float(np.mean((pred - eval_y) ** 2)),
               "base_mse": float(np.mean((_np_forward(host, eval_x) - eval_y) ** 2))}
        for path, delta in _learned_deltas(trainable, host).items():
            if path in planted:
                res[f"overlap/{path}"] = subspace_overlap(delta, planted[path], c.planted_k)
        return res

    return Task(fn=mlp_fn, params=params, source=f"planted_rank(seed={config.seed})",
                inputs=lambda b: (b["x"],), loss=loss, batches=batches, evaluate=evaluate,
                train_examples=c.train_examples)


def _learned_deltas(trainable: Any, base: dict) -> dict[str, np.ndarray]:
    adapters = adapters_of(trainable)
    if adapter_items(adapters):
        return {p: np.asarray(ad.delta()) for p, ad in adapter_items(adapters)}
    flat_base = dict(flat_paths(base))
    return {p: np.asarray(w) - flat_base[p] for p, w in flat_paths(trainable) if np.ndim(w) == 2}
