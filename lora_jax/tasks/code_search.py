"""The `code_search` task: retrieve a stdlib function's code from its docstring summary.

Data flow: `load_code_search` (build or reuse a JSON cache, split by module) ->
`tokenize_pairs` (fixed-length int32 numpy arrays) -> `iterate_batches` (deterministic,
resumable from one integer). Everything here is host-side numpy; nothing touches a device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lora_jax.tasks.stdlib_functions import Pair, extract_pairs, stdlib_dir

CACHE_FILENAME = "code_search_data.json"
CACHE_FORMAT = 1
DEFAULT_SEED = 0
DEFAULT_HOLDOUT_FRACTION = 0.2
QUERY_LEN = 64
CODE_LEN = 128
BATCH_KEYS = ("query_ids", "query_mask", "code_ids", "code_mask")


@dataclass(frozen=True)
class CodeSearchData:
    """Train / held-out pairs, disjoint by module, plus what the split was built from."""

    train: list[Pair]
    heldout: list[Pair]
    meta: dict[str, Any]


def python_version() -> str:
    """The interpreter version the stdlib (and so the dataset) comes from, e.g. "3.11.7"."""
    return ".".join(str(v) for v in sys.version_info[:3])


def split_by_module(
    pairs: Sequence[Pair],
    seed: int = DEFAULT_SEED,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
) -> tuple[list[Pair], list[Pair]]:
    """(train, heldout) with whole modules held out, so no near-duplicate code leaks across.

    The sorted module list is permuted with `np.random.default_rng(seed)`; the first
    round(fraction * n_modules) modules are held out. Pair order within each half is kept.
    """
    modules = sorted({p.module for p in pairs})
    order = np.random.default_rng(seed).permutation(len(modules))
    n_heldout = int(round(holdout_fraction * len(modules)))
    heldout_modules = {modules[i] for i in order[:n_heldout]}
    train = [p for p in pairs if p.module not in heldout_modules]
    heldout = [p for p in pairs if p.module in heldout_modules]
    return train, heldout


def _counts(train: Sequence[Pair], heldout: Sequence[Pair]) -> dict[str, int]:
    return {
        "pairs": len(train) + len(heldout),
        "modules": len({p.module for p in [*train, *heldout]}),
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "train_modules": len({p.module for p in train}),
        "heldout_modules": len({p.module for p in heldout}),
    }


def _expected_meta(seed: int, holdout_fraction: float, source_dir: str) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "python_version": python_version(),
        "source_dir": source_dir,
        "seed": seed,
        "holdout_fraction": holdout_fraction,
    }


def _read_cache(path: str, expected: dict[str, Any]) -> CodeSearchData | None:
    """The cached data if `path` exists, parses, and was built with exactly `expected` settings."""
    try:
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
        meta = blob["meta"]
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        train = [Pair(**p) for p in blob["train"]]
        heldout = [Pair(**p) for p in blob["heldout"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CodeSearchData(train=train, heldout=heldout, meta=meta)


def _write_cache(path: str, data: CodeSearchData) -> None:
    """Atomic write (temp file + rename), so concurrent readers never see half a file."""
    blob = {
        "meta": data.meta,
        "train": [dataclasses.asdict(p) for p in data.train],
        "heldout": [dataclasses.asdict(p) for p in data.heldout],
    }
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".code_search_", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(blob, f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@functools.lru_cache(maxsize=4)
def _built(source_dir: str, seed: int, holdout_fraction: float) -> CodeSearchData:
    """Parsing the stdlib takes ~10 s: a sweep of many runs in one process does it once."""
    train, heldout = split_by_module(extract_pairs(source_dir), seed, holdout_fraction)
    return CodeSearchData(train, heldout, {**_expected_meta(seed, holdout_fraction, source_dir),
                                           "counts": _counts(train, heldout)})


def load_code_search(
    cache_dir: str | None = None,
    seed: int = DEFAULT_SEED,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    source_dir: str | None = None,
) -> CodeSearchData:
    """The split dataset, from `<cache_dir>/code_search_data.json` when it matches, else built.

    A cache is reused only if its python version, source dir, seed and fraction all match;
    otherwise it is rebuilt and overwritten. `cache_dir=None` always builds and writes nothing.
    `source_dir` defaults to the running interpreter's stdlib.
    """
    source_dir = os.path.abspath(source_dir or stdlib_dir())
    expected = _expected_meta(seed, holdout_fraction, source_dir)
    path = os.path.join(cache_dir, CACHE_FILENAME) if cache_dir else None
    if path is not None and (cached := _read_cache(path, expected)) is not None:
        return cached
    data = _built(source_dir, seed, holdout_fraction)
    if path is not None:
        _write_cache(path, data)
    return data


def tokenize_texts(
    tokenizer: Tokenizer, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids_NxT, attention_mask_NxT), int32, T = max_len, [CLS] ... [SEP] then padding.

    Works on a copy: the caller's tokenizer keeps whatever truncation/padding it had.
    """
    tok = Tokenizer.from_str(tokenizer.to_str())
    pad = tokenizer.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token, direction="right")
    encodings = tok.encode_batch(list(texts))
    ids_NxT = np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(texts), max_len)
    mask_NxT = np.array([e.attention_mask for e in encodings], dtype=np.int32)
    return ids_NxT, mask_NxT.reshape(len(texts), max_len)


def tokenize_pairs(
    tokenizer: Tokenizer,
    pairs: Sequence[Pair],
    query_len: int = QUERY_LEN,
    code_len: int = CODE_LEN,
) -> dict[str, np.ndarray]:
    """{query_ids, query_mask: NxQ; code_ids, code_mask: NxC} int32 arrays for `pairs`."""
    query_ids, query_mask = tokenize_texts(tokenizer, [p.query for p in pairs], query_len)
    code_ids, code_mask = tokenize_texts(tokenizer, [p.code for p in pairs], code_len)
    return {
        "query_ids": query_ids,
        "query_mask": query_mask,
        "code_ids": code_ids,
        "code_mask": code_mask,
    }


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one epoch; the incomplete last batch is dropped."""
    return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's example order: a function of (seed, epoch) only, so it is recomputable."""
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def iterate_batches(
    arrays: dict[str, np.ndarray],
    batch_size: int,
    seed: int = DEFAULT_SEED,
    position: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless stream of batches {key: array[batch_size, ...]}, starting at batch `position`.

    `position` is the number of batches already consumed (e.g. the train step); batch p comes
    from epoch p // batches_per_epoch, reshuffled by `epoch_permutation(n, seed, epoch)`. So
    resuming needs only `position`: iterate_batches(a, bs, seed, k) yields exactly batches
    k, k+1, ... of iterate_batches(a, bs, seed, 0). Pure numpy; nothing is put on a device.
    """
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"arrays must share their first dimension; got sizes {sorted(sizes)}")
    (num_examples,) = sizes
    per_epoch = batches_per_epoch(num_examples, batch_size)
    if batch_size <= 0 or per_epoch == 0 or position < 0:
        raise ValueError(
            f"need 0 < batch_size <= {num_examples} and position >= 0; "
            f"got batch_size={batch_size}, position={position}"
        )
    epoch, index = divmod(position, per_epoch)
    while True:
        perm = epoch_permutation(num_examples, seed, epoch)
        for b in range(index, per_epoch):
            rows = perm[b * batch_size : (b + 1) * batch_size]
            yield {k: v[rows] for k, v in arrays.items()}
        epoch, index = epoch + 1, 0


def save_cache(cache_dir: str, data: CodeSearchData) -> None:
    """Keep the built set in `cache_dir` so later runs (and readers) reuse exactly this split."""
    _write_cache(os.path.join(cache_dir, CACHE_FILENAME), data)


def _pooled(hidden_BxTxD: Any, mask_BxT: Any) -> Any:
    from lora_jax.tasks.retrieval import l2_normalize, mean_pool

    return l2_normalize(mean_pool(hidden_BxTxD, mask_BxT))


def build(config: Any, placer: Any, workdir: str) -> Any:
    """The trainer's view: MiniLM (or any BERT-family encoder), InfoNCE, held-out R@k / MRR.

    The module split uses the fixed DEFAULT_SEED, so every training seed sees the same held-out
    modules; the training order follows `config.seed`.
    """
    from lora_jax.errors import LoraError
    from lora_jax.models import load
    from lora_jax.tasks.retrieval import info_nce_loss, retrieval_metrics
    from lora_jax.tasks.task import Task, model_options

    c = config.code_search
    model = load(config.model.path, dtype=config.model.dtype, shardings=placer, **model_options(config))
    if model.family != "bert" or model.tokenizer is None:
        raise LoraError(f"code_search needs a BERT-family encoder with tokenizer.json; "
                        f"{config.model.path} is {model.family}, tokenizer: {model.tokenizer is not None}")
    data = load_code_search(cache_dir=workdir if os.path.isdir(workdir) else None,
                            holdout_fraction=c.holdout)
    train = data.train[: c.max_train or None]
    heldout = data.heldout[: c.max_eval or None]
    train_arrays = tokenize_pairs(model.tokenizer, train, c.query_len, c.code_len)
    eval_arrays = tokenize_pairs(model.tokenizer, heldout, c.query_len, c.code_len)
    if len(train) < config.batch_size:
        raise LoraError(f"code_search has {len(train)} training pairs, fewer than batch_size "
                        f"{config.batch_size}")

    def loss(run, batch):
        q = _pooled(run(batch["query_ids"], batch["query_mask"]), batch["query_mask"])
        k = _pooled(run(batch["code_ids"], batch["code_mask"]), batch["code_mask"])
        value = info_nce_loss(q, k, c.temperature)
        return value, {"infonce": value}

    def embed(forward, ids, mask):
        out = []
        for i in range(0, len(ids), c.eval_batch):
            hidden = forward(ids[i : i + c.eval_batch], mask[i : i + c.eval_batch])
            out.append(np.asarray(_pooled(hidden, mask[i : i + c.eval_batch])))
        return np.concatenate(out)

    def evaluate(forward, trainable):
        del trainable
        q = embed(forward, eval_arrays["query_ids"], eval_arrays["query_mask"])
        k = embed(forward, eval_arrays["code_ids"], eval_arrays["code_mask"])
        return {name: float(v) for name, v in retrieval_metrics(q, k).items()}

    return Task(
        fn=model.fn, params=model.params, source=config.model.path,
        inputs=lambda b: (b["query_ids"], b["query_mask"]), loss=loss,
        batches=lambda position: iterate_batches(train_arrays, config.batch_size, config.seed, position),
        evaluate=evaluate, train_examples=len(train), tokenizer=model.tokenizer,
        save_cache=lambda directory: save_cache(directory, data), hf_model=model,
        dropout_fn=model.dropout_fn() if config.model.dropout else None,
        compiler_options=model.compiler_options,
    )
