"""Generation: the KV cache changes nothing, PEFT + transformers agree, mixed adapters per row."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import lora_jax
import lora_jax.models as M
from lora_jax import peft as lpeft
from lora_jax.adapters import adapter_items
from lora_jax.generate import generate, sample
from lora_jax.paths import nest

CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=260, hidden_size=64,
           intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
PROMPTS = [[1, 5, 9, 20, 33, 7], [1, 70], [1, 40, 41, 200]]  # ragged: left padding matters
N_NEW = 10


def _model(scan: bool = False, **overrides) -> M.LoadedModel:
    """A random tiny model with weights scaled up, so greedy paths are far from ties and varied."""
    model = M.from_config(dict(CFG, **overrides), seed=0, scan_layers=scan)
    model.params = jax.tree.map(lambda w: w * 6.0 if w.ndim >= 2 else w, model.params)
    return model


def _adapters(model, seed: int, rank: int = 8):
    """Random A and B (B non-zero), so the adapter really changes the generated text."""
    spec = lora_jax.LoraSpec(targets=M.DEFAULT_TARGETS["llama"], rank=rank, alpha=16.0)
    ids = np.asarray([PROMPTS[0]], np.int32)
    ad = lora_jax.init(jax.random.key(seed), model.fn, model.params, ids, np.ones_like(ids), spec=spec)
    out = {}
    for i, (path, a) in enumerate(adapter_items(ad)):
        key = jax.random.fold_in(jax.random.key(seed + 100), i)
        out[path] = dataclasses.replace(a, b=jax.random.normal(key, a.b.shape) * 0.3)
    return nest(out)


@pytest.mark.parametrize("scan,overrides", [(False, {}), (True, dict(model_type="mistral",
                                                                      sliding_window=4))])
def test_kv_cache_gives_the_tokens_of_full_recompute(scan, overrides):
    model = _model(scan, **overrides)
    cached = generate(model, PROMPTS, max_new_tokens=N_NEW, eos_ids=[])
    full = generate(model, PROMPTS, max_new_tokens=N_NEW, eos_ids=[], use_cache=False)
    assert cached == full
    assert all(len(row) == N_NEW for row in cached) and len({t for r in cached for t in r}) > 10


def test_each_row_gets_its_own_adapter():
    model = _model()
    ads = [_adapters(model, 1), _adapters(model, 2, rank=4)]
    index = [0, -1, 1]
    mixed = generate(model, PROMPTS, adapters=ads, adapter_index=index, max_new_tokens=N_NEW)
    for prompt, j, row in zip(PROMPTS, index, mixed, strict=True):
        alone = generate(model, [prompt], adapters=[ads[j]] if j >= 0 else [],
                         max_new_tokens=N_NEW)
        assert row == alone[0]
    base = generate(model, PROMPTS, adapters=ads, adapter_index=[-1] * 3, max_new_tokens=N_NEW)
    assert mixed[0] != base[0] and mixed[2] != base[2] and mixed[1] == base[1]


def test_sampling_top_p_keeps_the_nucleus_only():
    logits_BxV = np.log(np.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32))
    draws = np.asarray(sample(logits_BxV, jax.random.key(0), 1.0, 0.7, greedy=False))
    assert set(draws.tolist()) == {0, 1}  # 0.5 alone < 0.7; 0.5 + 0.3 reaches it
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.05
    free = np.asarray(sample(logits_BxV, jax.random.key(0), 1.0, 1.0, greedy=False))
    assert set(free.tolist()) == {0, 1, 2, 3}


def test_same_tokens_as_transformers_generate_with_peft(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in CFG.items() if k not in ("architectures", "model_type")})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            gain = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if gain else 0.0))
    hf.save_pretrained(tmp_path / "base")
    ours = M.load(tmp_path / "base")
    ad = _adapters(ours, 3)
    lpeft.save_adapter(tmp_path / "ad", ad, ours)
    theirs = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ad").eval()
    prompts = [PROMPTS[1], PROMPTS[2]]
    P = max(map(len, prompts))
    ids_BxP = torch.tensor([[0] * (P - len(p)) + p for p in prompts])  # left-padded, pad id 0
    with torch.no_grad():
        out = theirs.generate(input_ids=ids_BxP, attention_mask=(ids_BxP != 0).long(),
                              do_sample=False, max_new_tokens=N_NEW, eos_token_id=2, pad_token_id=0)
    expected = [list(map(int, row)) for row in out[:, ids_BxP.shape[1]:]]
    expected = [row[: row.index(2) + 1] if 2 in row else row for row in expected]
    got = generate(ours, prompts, adapters=[ad], max_new_tokens=N_NEW)
    assert got == expected
    assert got != generate(ours, prompts, max_new_tokens=N_NEW)


def _byte_tokenizer():
    """Token id = byte value + 3 (0-2 are pad, bos, eos): no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    table = sorted(alphabet)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(table)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_cli_prints_each_completion_and_refuses_bad_input(tmp_path, capsys):
    model = _model()
    M.save_pretrained(model, model.params, tmp_path / "m")
    tok = _byte_tokenizer()
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    lpeft.save_adapter(tmp_path / "ad", _adapters(model, 1), model)
    cmd = [sys.executable, "-m", "experiments.generate", "--model", str(tmp_path / "m"),
           "--adapter", f"a={tmp_path / 'ad'}", "--prompt", "hello", "--use", "a",
           "--prompt", "hi", "--max_new_tokens", "6"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = M.load(tmp_path / "m")
    ids = [tok.encode(t).ids for t in ("hello", "hi")]
    rows = generate(loaded, ids, adapters=[lpeft.load_adapter(tmp_path / "ad", loaded)],
                    adapter_index=[0, -1], max_new_tokens=6)
    want = ["### [a] 'hello'", tok.decode(rows[0]), "### [base] 'hi'", tok.decode(rows[1])]
    assert res.stdout.splitlines() == want

    from experiments.generate import main
    bad = {"--use b": [*cmd[3:7], "--prompt", "x", "--use", "b"],
           "no directory at": [*cmd[3:5], "--adapter", f"a={tmp_path / 'nope'}", "--prompt", "x"],
           "has no tokenizer.json": ["--model", str(tmp_path / "bare"), "--prompt", "x"]}
    M.save_pretrained(model, model.params, tmp_path / "bare")
    (tmp_path / "bare" / "tokenizer.json").unlink(missing_ok=True)
    for message, argv in bad.items():
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 8
