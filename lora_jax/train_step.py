"""The train state, the optimizer, and the pure train step `(state, batch) -> (state, metrics)`.

One split (lora_jax/trainable.py) decides everything about trainability: only `trainable` is
differentiated, held by the optimizer, checkpointed, and sharded as such; `frozen` is passed
through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

import lora_jax
from lora_jax.adapters import Adapter
from lora_jax.trainable import combine

PyTree = Any


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    opt_state: PyTree
    rng: jax.Array


def model_apply(method: str, fn: Callable, dropout_fn: Callable | None = None) -> Callable:
    """(trainable, frozen, *inputs, rng) -> outputs, for either method. With `dropout_fn`
    (fn(params, key, *inputs)) and an rng, the model's own dropout runs too (training only)."""

    def run(trainable, frozen, *inputs, rng=None):
        model, lead = fn, ()
        if dropout_fn is not None and rng is not None:
            model, lead = dropout_fn, (jax.random.fold_in(rng, 1),)
        if method == "full":
            return model(trainable, *lead, *inputs)
        return lora_jax.apply(model, combine(frozen, trainable["extra"]), trainable["adapters"],
                              *lead, *inputs, rng=rng, deterministic=rng is None)

    return run


def _labels(trainable: PyTree) -> PyTree:
    """"b" for LoRA B factors (LoRA+ gives them a larger step), "a" for everything else."""

    def label(path, _):
        last = path[-1]
        return "b" if getattr(last, "name", None) == "b" else "a"

    return jax.tree_util.tree_map_with_path(label, trainable)


def _decayed(trainable: PyTree) -> PyTree:
    """Weight decay on matrices, not on vectors (biases, norms) nor DoRA's magnitudes, which
    decay would pull towards a zero weight."""

    def decay(path, x):
        return x.ndim >= 2 and getattr(path[-1], "name", None) != "m"

    return jax.tree_util.tree_map_with_path(decay, trainable)


def make_optimizer(opt_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with warm-up + cosine, global-norm clipping and the LoRA+ ratio for B."""
    peak = opt_cfg.lr
    warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(total_steps, warmup + 1), end_value=peak * opt_cfg.end_lr_ratio
    )

    def adamw(scale: float):
        return optax.adamw(
            lambda s: schedule(s) * scale, b1=opt_cfg.b1, b2=opt_cfg.b2,
            weight_decay=opt_cfg.weight_decay, mask=_decayed,
        )

    tx = optax.multi_transform({"a": adamw(1.0), "b": adamw(opt_cfg.loraplus_ratio)}, _labels)
    if opt_cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), tx)
    return tx, schedule


def _split_micro(batch: dict, n: int) -> dict:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(apply_fn: Callable, loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: Callable, grad_accum: int, use_rng: bool) -> Callable:
    """The pure step; gradients are taken with respect to `state.trainable` only."""

    def grads_of(trainable, frozen, batch, rng):
        def loss_of(tr):
            model = lambda *inputs: apply_fn(tr, frozen, *inputs, rng=rng if use_rng else None)
            return loss_fn(model, batch)

        return jax.value_and_grad(loss_of, has_aux=True)(trainable)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum == 1:
            (loss, aux), grads = grads_of(state.trainable, state.frozen, batch, rng)
        else:  # average over microbatches; a contrastive loss then sees fewer in-batch negatives
            mbs = _split_micro(batch, grad_accum)

            def micro(acc, xs):
                i, mb = xs
                out = grads_of(state.trainable, state.frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, out), None

            first = jax.tree.map(lambda x: x[0], mbs)
            shapes = jax.eval_shape(lambda: grads_of(state.trainable, state.frozen, first, rng))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            total, _ = jax.lax.scan(micro, zeros, (jnp.arange(grad_accum), mbs))
            (loss, aux), grads = jax.tree.map(lambda x: x / grad_accum, total)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **aux}
        for name, sub in (("a", "a"), ("b", "b"), ("m", "m")):
            part = [getattr(x, sub) for x in jax.tree.leaves(grads, is_leaf=_is_adapter)
                    if isinstance(x, Adapter) and getattr(x, sub) is not None]
            if part:
                metrics[f"grad_norm_{name}"] = optax.tree.norm(part)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new, metrics

    return step


def _is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)
