"""Shared by the `jsonl_*` tasks: read and check user .jsonl files, load the model, batch rows.

A user file is read once on the host and every line checked before anything else happens, so
a bad line fails the run before the model is loaded or the workdir touched, as one line naming
file:line. Examples are kept as Python strings and tokenised batch by batch into numpy; only
the batch the trainer places ever reaches a device.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lora_jax.errors import LoraError
from lora_jax.tasks.task import model_options

FieldTypes = dict[str, tuple[type, ...]]


@dataclasses.dataclass(frozen=True)
class JsonlFile:
    """The checked records of one file: columns[field][i] comes from line line_numbers[i]."""

    path: str
    line_numbers: list[int]
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.line_numbers)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.line_numbers[i]}"

    def head(self, n: int) -> JsonlFile:
        """The first n records (all of them for n <= 0): the max_train / max_eval caps."""
        if n <= 0 or n >= len(self):
            return self
        return JsonlFile(self.path, self.line_numbers[:n], {k: v[:n] for k, v in self.columns.items()})


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def read_jsonl(path: str, fields: FieldTypes, key: str) -> JsonlFile:
    """Parse `path` (one JSON object per line, blank lines skipped) and check every field.

    `key` is the config field that named the file, so a missing path says what to set.
    """
    if not path:
        raise LoraError(f"{key} is not set; expected a .jsonl file with fields {', '.join(fields)}")
    if not Path(path).is_file():
        raise LoraError(f"{key}: no file at {path}")
    lines: list[int] = []
    columns: dict[str, list[Any]] = {f: [] for f in fields}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LoraError(f"{where}: not UTF-8 text") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise LoraError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise LoraError(f"{where}: expected a JSON object with fields {', '.join(fields)}, "
                                f"got {type(record).__name__}")
            for name, types in fields.items():
                if name not in record:
                    raise LoraError(f"{where}: missing field {name!r} (expected {', '.join(fields)})")
                value = record[name]
                if isinstance(value, bool) or not isinstance(value, types):
                    raise LoraError(f"{where}: field {name!r} must be {_type_names(types)}, "
                                    f"got {type(value).__name__}")
                columns[name].append(value)
            lines.append(number)
    if not lines:
        raise LoraError(f"{path} ({key}) is empty; expected one JSON object per line with fields "
                        f"{', '.join(fields)}")
    return JsonlFile(path, lines, columns)


def load_model(config: Any, placer: Any, task: str, families: tuple[str, ...]) -> Any:
    """The HF model at config.model.path with its tokenizer; the family is checked from
    config.json before any weight is read."""
    from lora_jax.models import family_of, load
    from lora_jax.models.loading import resolve

    path = config.model.path
    if not path:
        raise LoraError(f"{task} needs --config.model.path (an HF model directory or hub id)")
    directory = resolve(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise LoraError(f"{directory} has no config.json")
    family = family_of(json.loads(config_file.read_text()))
    if family not in families:
        kinds = {"llama": "a Llama-family decoder", "bert": "a BERT-family encoder"}
        raise LoraError(f"{task} needs {' or '.join(kinds[f] for f in families)}; {path} is "
                        f"{kinds[family]}" + (" (no LM head)" if family == "bert" else ""))
    if not (directory / "tokenizer.json").is_file():
        raise LoraError(f"{task} needs a tokenizer.json next to the model; {directory} has none")
    return load(directory, dtype=config.model.dtype, shardings=placer, **model_options(config))


def check_max_len(model: Any, max_len: int) -> None:
    """An encoder has a fixed position table; an id past it would be clamped silently."""
    limit = None
    if model.family == "bert":
        c = model.config
        limit = c.max_position_embeddings - (0 if c.model_type == "bert" else c.pad_token_id + 1)
    if max_len < 2 or (limit is not None and max_len > limit):
        raise LoraError(f"jsonl.max_len={max_len}; expected 2 .. {limit or 'any'} tokens for {model.source}")


def pad_id_of(model: Any) -> int:
    """BERT pads with its pad_token_id (RoBERTa positions depend on it); for a decoder the pad
    id is masked out everywhere, so any valid id does."""
    if model.family == "bert":
        return int(model.config.pad_token_id)
    pad = model.hf_config.get("pad_token_id")
    return pad if isinstance(pad, int) else 0


def eos_id_of(model: Any) -> int | None:
    eos = model.hf_config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else None


def bare_tokenizer(tokenizer: Tokenizer, max_len: int | None = None) -> Tokenizer:
    """A copy without padding (we pad in numpy) and cut at max_len (or not at all); the
    caller's tokenizer keeps its settings."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    if max_len is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length=max_len)
    return tok


def pad_rows(rows: list[list[int]], max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids_NxT, mask_NxT) int32 with T = max_len, right-padded."""
    ids_NxT = np.full((len(rows), max_len), pad_id, np.int32)
    mask_NxT = np.zeros((len(rows), max_len), np.int32)
    for i, row in enumerate(rows):
        ids_NxT[i, : len(row)] = row[:max_len]
        mask_NxT[i, : len(row)] = 1
    return ids_NxT, mask_NxT


def row_batches(num_rows: int, batch_size: int, seed: int, position: int) -> Iterator[np.ndarray]:
    """Row indices of batches position, position+1, ...: batch k is a pure function of (seed, k)
    (code_search's epoch-permutation scheme, last incomplete batch of each epoch dropped)."""
    from lora_jax.tasks.code_search import iterate_batches

    for batch in iterate_batches({"row": np.arange(num_rows)}, batch_size, seed, position):
        yield batch["row"]


def check_enough(train: JsonlFile, batch_size: int) -> None:
    if len(train) < batch_size:
        raise LoraError(f"{train.path} has {len(train)} examples, fewer than batch_size {batch_size}")


def eval_chunks(num_rows: int, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, real_N) chunks all of length `size` (the last padded by repeating row 0,
    real_N = 0 there), so evaluation compiles one shape."""
    for start in range(0, num_rows, size):
        rows = np.arange(start, min(start + size, num_rows))
        real = np.ones(size, np.float64)
        real[len(rows):] = 0.0
        yield np.concatenate([rows, np.zeros(size - len(rows), rows.dtype)]), real
