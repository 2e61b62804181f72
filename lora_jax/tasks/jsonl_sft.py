"""`jsonl_sft`: supervised fine-tuning of a Llama-family decoder on {"prompt", "completion"} lines.

Each example is tokenize(prompt) (with the tokenizer's own special tokens, e.g. BOS) followed by
tokenize(completion) without them, plus the model's EOS when `jsonl.add_eos`. Prompt and
completion are tokenised apart so the loss boundary is exact; only completion tokens are
predicted in the loss. Too long an example loses the start of its prompt first (the completion
is what is trained), then the end of its completion.

The task's fn returns the log-likelihood of each next token, [B,T], instead of [B,T,V] logits, so
held-out evaluation moves B*T numbers to the host rather than B*T*V. BERT-family encoders are
refused: they have no LM head to continue a prompt with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.models.lm_loss import next_token_fn
from lora_jax.tasks import jsonl
from lora_jax.tasks.task import Task

FIELDS = {"prompt": (str,), "completion": (str,)}
BATCH_KEYS = ("input_ids", "attention_mask", "target_ids", "loss_mask")


def join_example(prompt: list[int], completion: list[int], max_len: int) -> tuple[list[int], int]:
    """(token ids, how many of them are prompt) within max_len tokens.

    At least one prompt token is kept when there is one, so the first completion token is
    predicted from something.
    """
    kept = completion[: max_len - min(len(prompt), 1)]
    room = max_len - len(kept)
    prompt = prompt[max(len(prompt) - room, 0):]
    return prompt + kept, len(prompt)


def sft_arrays(rows: list[tuple[list[int], int]], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Batch arrays [N,T]: target_ids[t] = input_ids[t+1]; loss_mask[t] = 1 where that next
    token is a completion token (0 for prompt tokens and padding)."""
    ids_NxT, mask_NxT = jsonl.pad_rows([ids for ids, _ in rows], max_len, pad_id)
    completion_NxT = np.zeros_like(mask_NxT)
    for i, (ids, n_prompt) in enumerate(rows):
        completion_NxT[i, n_prompt : len(ids)] = 1
    pad_Nx1 = np.full((len(rows), 1), pad_id, np.int32)
    return {"input_ids": ids_NxT, "attention_mask": mask_NxT,
            "target_ids": np.concatenate([ids_NxT[:, 1:], pad_Nx1], axis=1),
            "loss_mask": np.concatenate([completion_NxT[:, 1:], np.zeros_like(pad_Nx1)], axis=1)}


def next_token_logp_fn(model: Any) -> Callable:
    """fn(params, input_ids, attention_mask, target_ids, chunked=False) -> log p(target_ids[t] |
    ids[:t+1]) [B,T]; chunked=True computes it without [B,T,V] float32 logits (training)."""
    return next_token_fn(model)


def completion_loss(run: Callable, batch: dict) -> tuple[Any, dict]:
    """Mean negative log-likelihood over the batch's completion tokens (chunked log-likelihoods)."""
    logp_BxT = run(*(batch[k] for k in BATCH_KEYS[:3]), True)
    weight_BxT = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(weight_BxT)
    value = -jnp.sum(logp_BxT * weight_BxT) / jnp.maximum(tokens, 1.0)
    return value, {"completion_tokens": tokens}


def build(config: Any, placer: Any, workdir: str) -> Task:
    del workdir
    c = config.jsonl
    train = jsonl.read_jsonl(c.train, FIELDS, "jsonl.train").head(c.max_train)
    heldout = jsonl.read_jsonl(c.eval, FIELDS, "jsonl.eval").head(c.max_eval)
    jsonl.check_enough(train, config.batch_size)
    model = jsonl.load_model(config, placer, "jsonl_sft", ("llama",))
    jsonl.check_max_len(model, c.max_len)
    tok = jsonl.bare_tokenizer(model.tokenizer)
    pad, eos = jsonl.pad_id_of(model), jsonl.eos_id_of(model)
    suffix = [eos] if c.add_eos and eos is not None else []

    def encode(data: jsonl.JsonlFile, rows: np.ndarray) -> dict[str, np.ndarray]:
        prompts = tok.encode_batch([data.columns["prompt"][r] for r in rows])
        completions = tok.encode_batch([data.columns["completion"][r] for r in rows],
                                       add_special_tokens=False)
        joined = [join_example(p.ids, q.ids + suffix, c.max_len) for p, q in zip(prompts, completions)]
        return sft_arrays(joined, c.max_len, pad)

    def batches(position: int) -> Iterator[dict[str, np.ndarray]]:
        for rows in jsonl.row_batches(len(train), config.batch_size, config.seed, position):
            yield encode(train, rows)

    def evaluate(forward, trainable) -> dict[str, float]:
        del trainable
        nll = tokens = 0.0
        for rows, real_N in jsonl.eval_chunks(len(heldout), c.eval_batch):
            arrays = encode(heldout, rows)
            logp_NxT = np.asarray(forward(*(arrays[k] for k in BATCH_KEYS[:3])), np.float64)
            weight_NxT = arrays["loss_mask"] * real_N[:, None]
            nll -= float(np.sum(logp_NxT * weight_NxT))
            tokens += float(np.sum(weight_NxT))
        loss = nll / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "completion_tokens": tokens}

    return Task(fn=next_token_logp_fn(model), params=model.params, source=model.source,
                inputs=lambda b: tuple(b[k] for k in BATCH_KEYS[:3]), loss=completion_loss,
                batches=batches, evaluate=evaluate, train_examples=len(train),
                tokenizer=model.tokenizer, hf_model=model,
                compiler_options=model.compiler_options)
