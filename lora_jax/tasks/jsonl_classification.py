"""`jsonl_classification`: text classification from user files, {"text": ..., "label": ...} per line.

Features: a BERT-family encoder's hidden states mean-pooled over real tokens; a Llama-family
decoder's final-norm hidden state at the last real token (as HF's LlamaForSequenceClassification:
under causal attention only that token has seen the whole text). The unused LM head is dropped.
A new linear head `params/cls_head/{kernel,bias}` maps features to class logits; it is trained
in full next to the adapters through `lora.train_also` (configs/jsonl_classification.py sets it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.errors import LoraError
from lora_jax.sharding import to_device
from lora_jax.tasks import jsonl
from lora_jax.tasks.task import Task

FIELDS = {"text": (str,), "label": (str, int)}
HEAD = "cls_head"
HEAD_INIT_STD = 0.02  # as HF's initializer_range: small, so the first logits are near uniform


def label_list(configured: str, train: jsonl.JsonlFile) -> list[str]:
    """The class names in class-id order: the configured comma-separated list, or the train
    file's labels sorted (numerically when all are integers)."""
    if configured.strip():
        labels = [s.strip() for s in configured.split(",")]
        if "" in labels or len(set(labels)) != len(labels):
            raise LoraError(f"jsonl.labels={configured!r}: expected distinct, non-empty "
                            "comma-separated labels")
        return labels
    values = set(train.columns["label"])
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def label_ids(data: jsonl.JsonlFile, labels: list[str]) -> np.ndarray:
    """Class id per record; a label outside `labels` is an error naming file:line."""
    index = {name: i for i, name in enumerate(labels)}
    out = np.zeros(len(data), np.int32)
    for i, value in enumerate(data.columns["label"]):
        if str(value) not in index:
            raise LoraError(f"{data.where(i)}: unknown label {value!r} (labels: {', '.join(labels)})")
        out[i] = index[str(value)]
    return out


def classifier_fn(model: Any) -> Callable:
    """fn(params, input_ids_BxT, attention_mask_BxT) -> class logits [B,C] (float32)."""
    if model.family == "bert":
        from lora_jax.models import mean_pool

        def features(base, ids_BxT, mask_BxT):
            return mean_pool(model.fn(base, ids_BxT, mask_BxT), mask_BxT)
    else:
        from lora_jax.models.llama import LlamaModel

        trunk = LlamaModel(model.config)

        def features(base, ids_BxT, mask_BxT):
            h_BxTxD, _ = trunk.apply({"params": base["params"]["model"]}, ids_BxT, mask_BxT)
            last_B = jnp.maximum(jnp.sum(mask_BxT, axis=1) - 1, 0)  # right padding
            pick_BxT = (jnp.arange(ids_BxT.shape[1])[None, :] == last_B[:, None]).astype(h_BxTxD.dtype)
            return jnp.einsum("btd,bt->bd", h_BxTxD, pick_BxT)

    def fn(params, input_ids_BxT, attention_mask_BxT):
        head = params["params"][HEAD]
        base = {"params": {k: v for k, v in params["params"].items() if k != HEAD}}
        x_BxD = features(base, input_ids_BxT, attention_mask_BxT).astype(jnp.float32)
        return x_BxD @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)[None, :]

    return fn


def head_params(hidden: int, num_labels: int, seed: int, placer: Any) -> dict:
    rng = np.random.default_rng([seed, 17])
    host = {"kernel": (HEAD_INIT_STD * rng.standard_normal((hidden, num_labels))).astype(np.float32),
            "bias": np.zeros(num_labels, np.float32)}
    return {k: to_device(v, placer(f"params/{HEAD}/{k}", v.shape)) for k, v in host.items()}


def build(config: Any, placer: Any, workdir: str) -> Task:
    del workdir
    c = config.jsonl
    train = jsonl.read_jsonl(c.train, FIELDS, "jsonl.train").head(c.max_train)
    heldout = jsonl.read_jsonl(c.eval, FIELDS, "jsonl.eval").head(c.max_eval)
    labels = label_list(c.labels, train)
    if len(labels) < 2:
        raise LoraError(f"{train.path}: a classifier needs at least 2 labels, found {labels}")
    y_train, y_eval = label_ids(train, labels), label_ids(heldout, labels)
    jsonl.check_enough(train, config.batch_size)
    model = jsonl.load_model(config, placer, "jsonl_classification", ("bert", "llama"))
    jsonl.check_max_len(model, c.max_len)
    tok = jsonl.bare_tokenizer(model.tokenizer, c.max_len)
    pad = jsonl.pad_id_of(model)
    base = {k: v for k, v in model.params["params"].items() if k != "lm_head"}
    params = {"params": {**base, HEAD: head_params(model.config.hidden_size, len(labels),
                                                   config.seed, placer)}}

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return jsonl.pad_rows([e.ids for e in tok.encode_batch(texts)], c.max_len, pad)

    def batches(position: int) -> Iterator[dict[str, np.ndarray]]:
        for rows in jsonl.row_batches(len(train), config.batch_size, config.seed, position):
            ids, mask = encode([train.columns["text"][r] for r in rows])
            yield {"input_ids": ids, "attention_mask": mask, "label": y_train[rows]}

    def loss(run, batch):
        logits_BxC = run(batch["input_ids"], batch["attention_mask"])
        value = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["label"]))
        accuracy = jnp.mean((jnp.argmax(logits_BxC, axis=-1) == batch["label"]).astype(jnp.float32))
        return value, {"accuracy": accuracy}

    def evaluate(forward, trainable) -> dict[str, float]:
        del trainable
        total_loss = correct = 0.0
        for rows, real_N in jsonl.eval_chunks(len(heldout), c.eval_batch):
            logits_NxC = np.asarray(forward(*encode([heldout.columns["text"][r] for r in rows])),
                                    np.float64)
            shifted_NxC = logits_NxC - np.max(logits_NxC, axis=-1, keepdims=True)
            logp_NxC = shifted_NxC - np.log(np.sum(np.exp(shifted_NxC), axis=-1, keepdims=True))
            y_N = y_eval[rows]
            total_loss -= float(np.sum(logp_NxC[np.arange(len(rows)), y_N] * real_N))
            correct += float(np.sum((np.argmax(logits_NxC, axis=-1) == y_N) * real_N))
        return {"accuracy": correct / len(heldout), "loss": total_loss / len(heldout)}

    return Task(fn=classifier_fn(model), params=params,
                source=f"{model.source} + {HEAD}({','.join(labels)})",
                inputs=lambda b: (b["input_ids"], b["attention_mask"]), loss=loss, batches=batches,
                evaluate=evaluate, train_examples=len(train), tokenizer=model.tokenizer,
                compiler_options=model.compiler_options)
