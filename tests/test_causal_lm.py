"""causal_lm: resumable windows, byte tokenizer, pretrain -> export -> load -> adapt, refusals."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.lm import lora as lora_config
from configs.lm import pretrain as pretrain_config
from lora_jax import LoraError
from lora_jax.models import load
from lora_jax.pretrain import base_dir, pretrain
from lora_jax.tasks import corpora
from lora_jax.tasks.causal_lm import next_token_loss
from lora_jax.trainer import train_and_evaluate


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_a_pure_function_of_seed_and_position():
    stream = np.arange(1000, dtype=np.uint16)
    seq_len, bs = 16, 4
    per_epoch = corpora.windows_per_epoch(stream, seq_len) // bs  # 61 windows -> 15 batches
    run = _take(corpora.iterate_windows(stream, seq_len, bs, seed=3), 2 * per_epoch + 5)
    for k in (0, 7, per_epoch, per_epoch + 4, 2 * per_epoch):
        resumed = _take(corpora.iterate_windows(stream, seq_len, bs, seed=3, position=k), 5)
        for a, b in zip(run[k:k + 5], resumed):
            assert a.keys() == b.keys() == {"input_ids", "attention_mask"}
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    ids = np.stack([b["input_ids"] for b in run])
    assert ids.dtype == np.int32 and ids.shape[1:] == (bs, seq_len)
    assert np.all(np.diff(ids, axis=-1) == 1)  # each window is a contiguous slice of the stream
    epoch0 = ids[:per_epoch, :, 0].ravel()
    assert len(set(epoch0.tolist())) == per_epoch * bs  # no window twice within an epoch
    assert len({int(s) % seq_len for s in epoch0}) == 1  # one grid offset per epoch
    assert not np.array_equal(ids[:per_epoch], ids[per_epoch:2 * per_epoch])  # reshuffled
    other = _take(corpora.iterate_windows(stream, seq_len, bs, seed=4), 3)
    assert not np.array_equal(other[0]["input_ids"], run[0]["input_ids"])


def test_byte_tokenizer_fast_path_equals_the_tokenizer_and_streams_end_documents_with_eos():
    tok = corpora.byte_tokenizer()
    text = "def f(x):\n    return 'héllo 🙂'\n"
    (fast,) = corpora.encode(tok, [text])
    assert fast.tolist() == tok.encode(text).ids == list(text.encode("utf-8"))
    assert tok.decode(fast.tolist()) == text
    stream = corpora.token_stream(tok, [("a", "ab"), ("b", "c")])
    assert stream.tolist() == [97, 98, 256, 99, 256]


def test_split_holds_out_whole_documents_the_same_way_every_time():
    docs = corpora.documents("pydoc_topics")
    train, held = corpora.split(docs, 0.1)
    assert len(held) == round(0.1 * len(docs)) and len(train) + len(held) == len(docs)
    assert not {n for n, _ in train} & {n for n, _ in held}
    assert corpora.split(corpora.documents("pydoc_topics"), 0.1) == (train, held)
    stdlib = {n for n, _ in corpora.documents("stdlib")}
    assert "json.decoder" in stdlib and not any(n.startswith("pydoc_data") for n in stdlib)


def test_next_token_loss_ignores_padding():
    logits_BxTxV = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 5)), jnp.float32)
    ids_BxT = jnp.asarray([[1, 2, 3, 4, 0, 0], [4, 3, 2, 1, 0, 1]], jnp.int32)
    mask_BxT = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    full = next_token_loss(logits_BxTxV, ids_BxT, mask_BxT)
    first = next_token_loss(logits_BxTxV[:1, :4], ids_BxT[:1, :4], mask_BxT[:1, :4])
    second = next_token_loss(logits_BxTxV[1:], ids_BxT[1:], mask_BxT[1:])
    np.testing.assert_allclose(full, (3 * first + 5 * second) / 8, rtol=1e-6)


def _tiny(c, tmp_path):
    c.causal_lm.update(hidden_size=32, intermediate_size=64, layers=1, heads=2, seq_len=32,
                       eval_windows=16, eval_batch=8, base_dir=str(tmp_path / "base"))
    c.batch_size, c.steps, c.log_every, c.ckpt_every = 8, 4, 2, 4
    c.optimizer.warmup_steps = 1
    return c


def _evals(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval/target_loss" in r]


def test_tiny_pretrain_exports_a_loadable_base_that_lora_adapts(tmp_path):
    pre = _tiny(pretrain_config.get_config("smoke"), tmp_path)
    out = pretrain(pre, str(tmp_path / "pre_run"))
    assert out == base_dir(pre) == str(tmp_path / "base")
    model = load(out)
    assert model.family == "llama" and model.tokenizer.encode("hi").ids == [104, 105]
    base_end = _evals(tmp_path / "pre_run")[-1]
    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert pretrain(pre, str(tmp_path / "other_run")) == out  # cached: nothing retrained
    assert not (tmp_path / "other_run").exists()
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp

    c = _tiny(lora_config.get_config("smoke"), tmp_path)
    c.model.path = out
    c.optimizer.lr = 1e-2
    res = train_and_evaluate(c, str(tmp_path / "adapt"))
    evals = _evals(tmp_path / "adapt")
    assert [r["step"] for r in evals] == [0, 4]
    keys = {f"eval/{r}_{m}" for r in ("target", "source") for m in ("loss", "ppl")}
    assert keys <= evals[0].keys() and keys <= evals[-1].keys()
    for key in keys:  # step 0 is the exported base, evaluated exactly as at the end of pretraining
        np.testing.assert_allclose(evals[0][key], base_end[key], rtol=1e-5)
    assert evals[-1]["eval/target_loss"] < evals[0]["eval/target_loss"]
    np.testing.assert_allclose(evals[-1]["eval/target_ppl"], np.exp(evals[-1]["eval/target_loss"]),
                               rtol=1e-6)
    assert res["trainable"]["adapters"]


def test_missing_base_names_the_pretrain_command(tmp_path):
    c = lora_config.get_config("smoke")
    c.model.path = str(tmp_path / "no_base")
    with pytest.raises(LoraError, match=r"no pretrained causal_lm base at .*no_base; make it first "
                       r"with: python -m experiments\.pretrain --config=configs/lm/pretrain\.py:smoke$"):
        train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_pretrain_refuses_an_adaptation_config(tmp_path):
    with pytest.raises(LoraError, match=r"a pretrain config needs .*got \{'method': 'lora'"):
        pretrain(lora_config.get_config("smoke"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_scanned_pretrain_exports_per_layer_weights_that_unscanned_runs_read(tmp_path):
    pre = _tiny(pretrain_config.get_config("smoke"), tmp_path)
    pre.causal_lm.layers, pre.model.scan_layers, pre.model.remat = 2, True, "full"
    out = pretrain(pre, str(tmp_path / "pre_run"))
    assert "model.layers.1.self_attn.q_proj.weight" in load_file(os.path.join(out, "model.safetensors"))
    c = _tiny(lora_config.get_config("smoke"), tmp_path)
    c.causal_lm.layers, c.model.path, c.steps = 2, out, 2
    train_and_evaluate(c, str(tmp_path / "adapt"))
    base_end, start = _evals(tmp_path / "pre_run")[-1], _evals(tmp_path / "adapt")[0]
    np.testing.assert_allclose(start["eval/source_loss"], base_end["eval/source_loss"], rtol=1e-5)
    hashed = pretrain_config.get_config("smoke")
    unscanned = base_dir(hashed)
    hashed.model.scan_layers = True
    assert base_dir(hashed) != unscanned  # stacked layers are initialised differently
