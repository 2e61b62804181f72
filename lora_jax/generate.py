"""Batched text generation for the Llama-family models, each row with its own adapter (or none).

    rows = generate(model, [[1, 5, 9], [1, 7]], adapters=[ad_a], adapter_index=[0, -1],
                    max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)

Prompts are left-padded so every row decodes in lockstep; RoPE positions count real tokens only.
The prompt is prefilled in one call into a fixed-size KV cache, then one token per step inside a
single jitted `lax.while_loop` (compiled once per batch shape), stopping when every row has hit
EOS or after `max_new_tokens`. Adapters are stacked and served with `lora_jax.apply(...,
adapter_index=...)`, so a mixed batch is one call with no merged weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.errors import LoraError
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache

PyTree = Any


def decode_fn(config: LlamaConfig) -> Callable:
    """fn(params, ids_BxT, mask_BxT, cache, positions_BxT) -> (logits_BxTxV, new_cache).

    A plain function of params, so `lora_jax.apply` can wrap it like any forward."""
    module = LlamaForCausalLM(config)

    def fn(params, ids_BxT, mask_BxT, cache, positions_BxT):
        return module.apply(params, ids_BxT, mask_BxT, positions_BxT, cache)

    return fn


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BxP, mask_BxP) with each prompt right-aligned, so the last column is real for all."""
    P = max(len(p) for p in prompts)
    ids_BxP = np.full((len(prompts), P), pad_id, np.int32)
    mask_BxP = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        if len(p):
            ids_BxP[b, P - len(p):] = p
            mask_BxP[b, P - len(p):] = 1
    return ids_BxP, mask_BxP


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           greedy: bool) -> jax.Array:
    """Next tokens [B]: argmax, or a draw from the smallest top set holding top_p of the mass."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
    sorted_BxV = jnp.flip(jnp.sort(scaled_BxV, axis=-1), axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = (mass_before_BxV < top_p) | (top_p >= 1.0)
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    masked_BxV = jnp.where(scaled_BxV >= cutoff_Bx1, scaled_BxV, -jnp.inf)
    return jax.random.categorical(key, masked_BxV, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(config: LlamaConfig, n_new: int, greedy: bool, use_cache: bool) -> Callable:
    """The whole generation (prefill + decode loop) as one jitted function of arrays."""
    decode = decode_fn(config)
    module = LlamaForCausalLM(config)
    full = lambda params, ids_BxS, mask_BxS: module.apply(params, ids_BxS, mask_BxS)

    def run(params, adapters, index_B, ids_BxP, mask_BxP, eos_E, pad, temperature, top_p, key):
        def call(fn, *args):
            if adapters is None:
                return fn(params, *args)
            return lora_jax.apply(fn, params, adapters, *args, adapter_index=index_B)

        B, P = ids_BxP.shape
        S = P + n_new
        if use_cache:
            dtype = params["params"]["model"]["embed_tokens"]["embedding"].dtype
            positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
            logits_BxPxV, cache = call(decode, ids_BxP, mask_BxP, init_cache(config, B, S, dtype),
                                       positions_BxP)
            memory = (cache, positions_BxP[:, -1])
            logits_BxV = logits_BxPxV[:, -1]
        else:  # the reference: the plain forward over the whole (growing) sequence every step
            pad_BxN = jnp.full((B, n_new), pad, jnp.int32)
            memory = (jnp.concatenate([ids_BxP, pad_BxN], axis=1),
                      jnp.concatenate([mask_BxP, jnp.zeros_like(pad_BxN)], axis=1))
            logits_BxV = call(full, *memory)[:, P - 1]

        def step(state):
            i, out_BxN, done_B, logits_BxV, memory = state
            tok_B = sample(logits_BxV, jax.random.fold_in(key, i), temperature, top_p, greedy)
            tok_B = jnp.where(done_B, pad, tok_B)
            out_BxN = jax.lax.dynamic_update_slice(out_BxN, tok_B[:, None], (0, i))
            done_B = done_B | jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
            if use_cache:
                cache, pos_B = memory
                pos_B = pos_B + 1
                logits_Bx1xV, cache = call(decode, tok_B[:, None], jnp.ones((B, 1), jnp.int32),
                                           cache, pos_B[:, None])
                return i + 1, out_BxN, done_B, logits_Bx1xV[:, 0], (cache, pos_B)
            buf_BxS, mask_BxS = memory
            buf_BxS = jax.lax.dynamic_update_slice(buf_BxS, tok_B[:, None], (0, P + i))
            mask_BxS = jax.lax.dynamic_update_slice(mask_BxS, jnp.ones((B, 1), jnp.int32), (0, P + i))
            logits_BxSxV = call(full, buf_BxS, mask_BxS)
            logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxSxV, P + i, axis=1, keepdims=False)
            return i + 1, out_BxN, done_B, logits_BxV, (buf_BxS, mask_BxS)

        def more(state):
            return (state[0] < n_new) & ~jnp.all(state[2])

        out_BxN = jnp.full((B, n_new), pad, jnp.int32)
        state = (jnp.zeros((), jnp.int32), out_BxN, jnp.zeros((B,), bool), logits_BxV, memory)
        return jax.lax.while_loop(more, step, state)[1]

    return jax.jit(run)


def _eos_list(eos_ids: int | Sequence[int] | None) -> list[int]:
    if eos_ids is None:
        return []
    return [int(eos_ids)] if isinstance(eos_ids, (int, np.integer)) else [int(e) for e in eos_ids]


def trim(row: Sequence[int], eos_ids: int | Sequence[int] | None) -> list[int]:
    """A row's tokens up to and including its first EOS (what follows is padding)."""
    eos = set(_eos_list(eos_ids))
    out = []
    for t in row:
        out.append(int(t))
        if t in eos:
            break
    return out


def generate(model: Any, prompts: Sequence[Sequence[int]], *, adapters: Sequence[PyTree] = (),
             adapter_index: Sequence[int] | None = None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: int | Sequence[int] | None = None, pad_id: int | None = None,
             use_cache: bool = True) -> list[list[int]]:
    """New tokens per prompt (EOS included, nothing after it); temperature 0 is greedy.

    `model` is a `lora_jax.models` LoadedModel of the Llama family. Row b uses
    `adapters[adapter_index[b]]` (-1: the base alone); with one adapter and no index, all rows
    use it. `eos_ids`/`pad_id` default to the model's config.json. `use_cache=False` recomputes
    the full prefix every step (the slow reference the cache is tested against).
    """
    if model.family != "llama":
        raise LoraError(f"generation needs a Llama-family decoder; this model is '{model.family}'")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LoraError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise LoraError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LoraError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    hf = model.hf_config
    eos = _eos_list(hf.get("eos_token_id") if eos_ids is None else eos_ids)
    if pad_id is None:
        pad_id = hf.get("pad_token_id") if hf.get("pad_token_id") is not None else (eos or [0])[0]
    stacked, index_B = None, None
    if adapters:
        if adapter_index is None:
            if len(adapters) != 1:
                raise LoraError(f"{len(adapters)} adapters given: say which row uses which "
                                "with adapter_index")
            adapter_index = [0] * len(prompts)
        if len(adapter_index) != len(prompts) or any(not -1 <= i < len(adapters)
                                                     for i in adapter_index):
            raise LoraError(f"adapter_index needs one entry in -1..{len(adapters) - 1} per prompt; "
                            f"got {list(adapter_index)} for {len(prompts)} prompts")
        stacked = lora_jax.stack_adapters(list(adapters))
        index_B = jnp.asarray(adapter_index, jnp.int32)
    elif adapter_index is not None and any(i != -1 for i in adapter_index):
        raise LoraError("adapter_index given without adapters")
    ids_BxP, mask_BxP = left_pad(prompts, pad_id)
    run = _compiled(model.config, int(max_new_tokens), temperature == 0.0, use_cache)
    out_BxN = run(model.params, stacked, index_B, ids_BxP, mask_BxP, jnp.asarray(eos, jnp.int32),
                  jnp.int32(pad_id), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                  jax.random.key(seed))
    return [trim(row, eos) for row in np.asarray(out_BxN).tolist()]
