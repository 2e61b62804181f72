"""Shared pieces of the ablation configs: the config shape, target sets, the two base runs.

An ablation config is {kind, title, description, run, sweep, metric, higher_is_better, analysis};
`run` is an ordinary training config and each sweep entry is {"name", "tags", "dotted.key": value}.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import base, planted, r16

# MiniLM (BERT) weight sets, as in Hu et al. Tables 5/6 plus "all linear" (Biderman et al.).
BERT_TARGETS = {
    "q": r".*/query/kernel",
    "q,v": r".*/(query|value)/kernel",
    "q,k,v,o": r".*/(query|key|value|attention/output/dense)/kernel",
    "all linear": r".*/(query|key|value|attention/output/dense|intermediate/dense|output/dense)/kernel",
}
# The planted MLP's stand-ins for the smoke variants (same code path, seconds per run).
PLANTED_TARGETS = {"l1": r"layers_1/kernel", "l0,l1": r"layers_(0|1)/kernel", "all": r"layers_\d+/kernel"}


def ablation(
    kind: str,
    title: str,
    description: str,
    run: ml_collections.ConfigDict,
    sweep: list[dict],
    metric: str,
    higher_is_better: bool,
    **analysis: Any,
) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = kind
    c.title = title
    c.description = description
    c.run = run
    c.sweep = sweep
    c.metric = metric
    c.higher_is_better = higher_is_better
    c.analysis = ml_collections.ConfigDict(analysis)
    return c


def code_search_run() -> ml_collections.ConfigDict:
    """MiniLM code search shrunk for CPU sweeps: 32/64-token query/code (paper-scale is 64/128),
    batch 16, 40 steps, 512 held-out pairs. Measured ~1-2 s per step on 2 shared cores."""
    c = r16.get_config()
    c.code_search.query_len = 32
    c.code_search.code_len = 64
    c.code_search.max_eval = 512
    c.batch_size = 16
    c.steps = 40
    c.log_every = 5
    c.ckpt_every = 20
    c.keep_checkpoints = 1
    return c


def planted_run(smoke: bool, width: int = 64, k: int = 4, steps: int = 300) -> ml_collections.ConfigDict:
    """The planted_rank teacher/student MLP (about 100 steps/s on CPU)."""
    c = planted.get_config("smoke" if smoke else None)
    c.planted_rank.width = width
    c.planted_rank.planted_k = k
    c.steps = steps
    c.log_every = max(1, steps // 30)
    c.ckpt_every = steps
    c.eval_every = 0
    c.keep_checkpoints = 1
    return c


def check_arg(arg: str | None) -> bool:
    """True for the `:smoke` variant; anything else but the default is an error (as base.variant)."""
    base.variant(base.get_config(), arg)
    return arg == "smoke"
