"""What the trainer needs from a task; `lora_jax/tasks/<name>.py` provides
`build(config, placer, workdir)` (placer: (path, shape) -> sharding for the base params)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

PyTree = Any
Batch = dict[str, np.ndarray]


def model_options(config: Any) -> dict[str, Any]:
    """The `model.*` fields that say how the model runs: layer layout, recompute, attention kernel,
    quantised frozen weights."""
    m = config.model
    return dict(scan_layers=m.scan_layers, remat=m.remat, attention=m.attention,
                quant=None if m.quant == "none" else m.quant)


@dataclasses.dataclass
class Task:
    """A model plus its data, loss and evaluation.

    fn(params, *inputs): the model's pure forward function; the transform is applied to it.
    params: the base weights, already placed with the shardings the trainer asked for.
    source: identifies the base (hub id or path); part of the checkpoint fingerprint.
    inputs(batch): the model inputs taken from a batch (also used as init's example args).
    loss(model, batch): (scalar loss, dict of scalar metrics); model(*inputs) runs the forward
      with the weights being trained.
    batches(position): global numpy batches from `position` (batches already consumed) on,
      deterministic for the config's seed.
    evaluate(forward, trainable): held-out metrics; forward(*numpy inputs) -> numpy outputs
      runs the current model; trainable is the tree being trained (adapters or params).
    train_examples: examples per epoch.
    hf_model: the `lora_jax.models.LoadedModel` whose weights `params` are, when the task trains
      a Hugging Face architecture as it is (PEFT / merged exports, lora_jax/run_export.py);
      None for models of the task's own making or with task-added heads (planted_rank,
      jsonl_classification). Its `source` is "" for a base made from scratch (no HF directory).
    dropout_fn: `fn` with the model's own dropout, for model.dropout; None where the task has none.
    compiler_options: XLA options the trainer compiles the step and forward with
      (lora_jax/models/compile_options.py); empty for jaxlib's defaults.
    """

    fn: Callable
    params: PyTree
    source: str
    inputs: Callable[[Batch], tuple]
    loss: Callable[[Callable, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
    batches: Callable[[int], Iterator[Batch]]
    evaluate: Callable[[Callable, PyTree], dict[str, float]]
    train_examples: int
    tokenizer: Any = None
    save_cache: Callable[[str], None] | None = None  # keeps built data in the workdir
    hf_model: Any = None
    dropout_fn: Callable | None = None  # fn(params, key, *inputs) with the model's own dropout on
    compiler_options: dict[str, str] = dataclasses.field(default_factory=dict)
