"""Text corpora that every install has, a byte-level tokenizer, and resumable token windows.

Corpora: "stdlib" (the interpreter's standard-library .py sources, pydoc_data excluded),
"pydoc_topics" (the English help topics in `pydoc_data.topics`), or the name of any installed
package (its .py sources, tests skipped), e.g. "numpy". A corpus is a sorted list of documents,
split by whole documents into train / held-out, each half joined with <|endoftext|> into one
token stream held on the host as uint16 numpy. Batches are windows cut from that stream as a pure
function of (seed, position), so nothing is ever loaded whole onto a device.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lora_jax.errors import LoraError
from lora_jax.tasks.stdlib_functions import iter_module_files, stdlib_dir

EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 bytes + EOS
SPLIT_SEED = 0  # fixed: every training seed sees the same held-out documents
Document = tuple[str, str]  # (name, text)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer() -> Tokenizer:
    """Token id == UTF-8 byte value, EOS = 256: no training, nothing to go out of date."""
    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def _is_byte_level(tok: Tokenizer) -> bool:
    probe = "def f(x):\n\treturn 'é🙂'"
    return (tok.get_vocab_size() == BYTE_VOCAB and tok.token_to_id(EOS) == 256
            and tok.encode(probe).ids == list(probe.encode("utf-8")))


def encode(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """uint16 ids per text; the byte-level tokenizer takes a numpy fast path with equal output."""
    if _is_byte_level(tok):
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint16) for t in texts]
    if tok.get_vocab_size() > np.iinfo(np.uint16).max:
        raise LoraError(f"tokenizer vocabulary of {tok.get_vocab_size()} does not fit uint16")
    return [np.asarray(e.ids, np.uint16) for e in tok.encode_batch(list(texts))]


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def documents(name: str) -> list[Document]:
    """The corpus `name` as (name, text) pairs, sorted by name."""
    if name == "pydoc_topics":
        from pydoc_data.topics import topics

        return sorted(topics.items())
    if name == "stdlib":
        return [(m, _read(p)) for m, p in iter_module_files(stdlib_dir())
                if not m.startswith("pydoc_data")]
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise LoraError(f"corpus {name!r}: expected stdlib, pydoc_topics or an installed package")
    root = list(spec.submodule_search_locations)[0]
    docs = [(f"{name}.{m}", _read(p)) for m, p in iter_module_files(root)]
    init = os.path.join(root, "__init__.py")
    if os.path.isfile(init):
        docs.append((name, _read(init)))
    return sorted(docs)


def split(docs: Sequence[Document], holdout: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out), whole documents held out so no file leaks across."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    held = set(order[: int(round(holdout * len(docs)))].tolist())
    return ([d for i, d in enumerate(docs) if i not in held],
            [d for i, d in enumerate(docs) if i in held])


def token_stream(tok: Tokenizer, docs: Sequence[Document]) -> np.ndarray:
    """All documents' ids, each followed by EOS, as one uint16 host array."""
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise LoraError(f"the tokenizer has no {EOS} token to separate documents")
    parts = encode(tok, [text for _, text in docs])
    sep = np.array([eos], np.uint16)
    return np.concatenate([x for ids in parts for x in (ids, sep)]) if parts else sep[:0]


def windows_per_epoch(stream: np.ndarray, seq_len: int) -> int:
    """Non-overlapping windows that fit after any offset in [0, seq_len)."""
    return max(len(stream) // seq_len - 1, 0)


def iterate_windows(stream: np.ndarray, seq_len: int, batch_size: int, seed: int,
                    position: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches {input_ids, attention_mask: int32 [batch_size, seq_len]} from batch `position` on.

    Epoch e shifts the window grid by an offset and shuffles the windows, both drawn from
    default_rng([seed, e]); so batch p depends on (seed, p) only and resuming needs just p.
    """
    n = windows_per_epoch(stream, seq_len)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise LoraError(f"a token stream of {len(stream)} holds fewer than batch_size={batch_size} "
                        f"windows of seq_len={seq_len}")
    epoch, index = divmod(position, per_epoch)
    cols_T = np.arange(seq_len)
    while True:
        rng = np.random.default_rng([seed, epoch])
        offset = int(rng.integers(seq_len))
        perm = rng.permutation(n)
        for b in range(index, per_epoch):
            starts_B = offset + perm[b * batch_size:(b + 1) * batch_size] * seq_len
            ids_BxT = stream[starts_B[:, None] + cols_T[None, :]].astype(np.int32)
            yield {"input_ids": ids_BxT, "attention_mask": np.ones_like(ids_BxT)}
        epoch, index = epoch + 1, 0


def eval_windows(stream: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """Up to `count` non-overlapping windows spread evenly over the stream: int32 [N, seq_len]."""
    total = len(stream) // seq_len
    if total == 0:
        raise LoraError(f"held-out stream of {len(stream)} tokens is shorter than seq_len={seq_len}")
    picks_N = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))
    return stream[picks_N[:, None] * seq_len + np.arange(seq_len)[None, :]].astype(np.int32)
