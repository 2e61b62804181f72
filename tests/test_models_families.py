"""Qwen3 and Gemma 3 (text) against transformers: logits, greedy KV-cache generation, PEFT both ways.

Tiny random checkpoints written by transformers' save_pretrained, weights moved well away from
init. The Gemma 3 model alternates sliding (window 4) and full layers with different RoPE bases
(the full one linearly scaled), sets query_pre_attn_scalar and final-logit soft-capping, and is
fed sequences longer than its window.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install .[parity])")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
peft = pytest.importorskip("peft", reason="PEFT interop tests need peft")

import zoo  # noqa: E402

import lora_jax  # noqa: E402
import lora_jax.models as M  # noqa: E402
from lora_jax import peft as lpeft  # noqa: E402
from lora_jax.adapters import adapter_items  # noqa: E402
from lora_jax.errors import LoraError  # noqa: E402
from lora_jax.generate import generate  # noqa: E402
from lora_jax.models.lm_loss import next_token_fn  # noqa: E402
from lora_jax.models.precision import grouped_attention  # noqa: E402
from lora_jax.paths import nest  # noqa: E402
from lora_jax.sharding import make_mesh, param_sharding  # noqa: E402

pytestmark = pytest.mark.parity
ATOL = 1e-4  # fp32, fixed once
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
GEMMA_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}
CASES = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(SMALL, num_hidden_layers=2)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        SMALL, num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=GEMMA_ROPE, final_logit_softcapping=5.0)),
}
rng = np.random.default_rng(0)
IDS = rng.integers(3, 96, size=(3, 12)).astype(np.int32)
MASK = np.ones((3, 12), np.int32)
MASK[1, :4] = 0  # row 1 left-padded by 4, row 2 by 1
MASK[2, :1] = 0
PADDED_IDS = np.where(MASK > 0, IDS, 0).astype(np.int32)
PROMPTS = [[5, 9, 20, 33, 7, 11], [70, 3], [40, 41, 90, 12]]  # ragged; the longest passes the window
N_NEW = 8
EOS = 2


def _torch_model(name: str):
    arch, config_cls, kwargs = CASES[name]
    config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            gain = "norm" in pname and pname.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if gain else 0.0))
    return model


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(name, torch model, directory written by transformers)."""
    model = _torch_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


def _fresh_torch(name, directory):
    return getattr(transformers, CASES[name][0]).from_pretrained(
        directory, attn_implementation="eager").eval()


def _assert_match(ours, theirs, mask):  # at ATOL, on the unpadded positions
    zoo.assert_match_on_real_tokens(ours, theirs, mask, ATOL)


@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_transformers(checkpoint, scan):
    name, torch_model, directory = checkpoint
    ours = M.load(directory, scan_layers=scan)
    assert ours.family == "llama" and ours.config.qk_norm
    got = jax.jit(ours.fn)(ours.params, jnp.asarray(PADDED_IDS), jnp.asarray(MASK))
    theirs = _logits(torch_model, PADDED_IDS, MASK)
    _assert_match(got, theirs, MASK)
    if name == "gemma3" and not scan:  # soft-capped within (-5, 5); the chunked loss caps too
        assert ours.config.layer_types[1] == "full_attention" and ours.config.tie_word_embeddings
        assert 4.0 < float(jnp.max(jnp.abs(got))) < 5.0
        targets = np.roll(PADDED_IDS, -1, axis=1)
        logp = jax.jit(next_token_fn(ours, chunk=5), static_argnums=4)(
            ours.params, PADDED_IDS, MASK, targets, True)
        want = np.take_along_axis(jax.nn.log_softmax(theirs, axis=-1), targets[..., None], -1)[..., 0]
        _assert_match(logp, np.asarray(want), MASK)


def test_greedy_kv_cache_generation_gives_transformers_tokens(checkpoint):
    name, torch_model, directory = checkpoint
    ours = M.load(directory, scan_layers=name == "gemma3")  # Gemma's layer kinds under scan
    P = max(map(len, PROMPTS))
    ids_BxP = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids_BxP, attention_mask=(ids_BxP != 0).long(),
                                   do_sample=False, max_new_tokens=N_NEW, eos_token_id=EOS,
                                   pad_token_id=0)
    expected = [list(map(int, row)) for row in out[:, P:]]
    expected = [row[: row.index(EOS) + 1] if EOS in row else row for row in expected]
    got = generate(ours, PROMPTS, max_new_tokens=N_NEW, eos_ids=[EOS], pad_id=0)
    assert got == expected
    assert P + N_NEW > 2 * 4 and len({t for row in got for t in row}) > 4


@pytest.mark.parametrize("checkpoint", ["gemma3"], indirect=True)
def test_sharded_scanned_remat_gradients_match_and_bf16_tracks_fp32(checkpoint):
    """Scan + remat + params on a (data 2, fsdp 2, tensor 2) mesh: the same gradients as the plain
    unscanned model (compared by HF name); bf16 weights stray from fp32 logits no more than twice
    as far as transformers' bf16 does."""
    _, torch_model, directory = checkpoint
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    weights_BxTxV = jnp.asarray(rng.normal(size=(3, 12, 96)) * 0.01, jnp.float32)  # grads ~1

    def grads(model):
        loss = lambda p: jnp.sum(model.fn(p, PADDED_IDS, MASK) * weights_BxTxV)
        return M.hf_state_dict(jax.jit(jax.grad(loss))(model.params))

    plain = grads(M.load(directory))
    sharded = M.load(directory, scan_layers=True, remat="full", shardings=param_sharding(mesh))
    q_kernel = sharded.params["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    got = grads(sharded)
    assert got.keys() == plain.keys() and max(np.abs(g).max() for g in plain.values()) > 0.5
    for key, g in plain.items():
        np.testing.assert_allclose(got[key], g, atol=ATOL, rtol=0, err_msg=key)
    half = M.load(directory, dtype=jnp.bfloat16, scan_layers=True, shardings=param_sharding(mesh))
    logits = np.asarray(jax.jit(half.fn)(half.params, PADDED_IDS, MASK), np.float32)
    theirs = _logits(torch_model, PADDED_IDS, MASK)
    with torch.no_grad():  # transformers' own bf16 error is the yardstick (~0.2 here)
        theirs_bf16 = _fresh_torch("gemma3", directory).to(torch.bfloat16)(
            input_ids=torch.tensor(PADDED_IDS, dtype=torch.long),
            attention_mask=torch.tensor(MASK)).logits.float().numpy()
    real = MASK > 0
    assert np.abs(logits - theirs)[real].max() < 2 * np.abs(theirs_bf16 - theirs)[real].max()


def _our_adapters(model, seed: int = 0):
    """q/v adapters of rank 4 with B non-zero, so they change the logits."""
    spec = lora_jax.LoraSpec(targets=M.DEFAULT_TARGETS["llama"], rank=4, alpha=8.0)
    ad = lora_jax.init(jax.random.key(seed), model.fn, model.params, IDS, MASK, spec=spec)
    out = {}
    for i, (path, a) in enumerate(adapter_items(ad)):
        b = jax.random.normal(jax.random.fold_in(jax.random.key(seed + 1), i), a.b.shape) * 0.3
        out[path] = dataclasses.replace(a, b=b)
    return nest(out)


def test_peft_adapters_both_ways_and_merged_export(checkpoint, tmp_path):
    name, _, directory = checkpoint
    ours = M.load(directory)
    forward = jax.jit(lambda ad: lora_jax.apply(ours.fn, ours.params, ad, PADDED_IDS, MASK))
    # PEFT's adapter (q_proj, v_proj; B set non-zero) read here
    pm = peft.get_peft_model(_fresh_torch(name, directory),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.eval().save_pretrained(tmp_path / "theirs")
    theirs = lpeft.load_adapter(tmp_path / "theirs", ours)
    assert {p.split("/")[-2] for p, _ in adapter_items(theirs)} == {"q_proj", "v_proj"}
    _assert_match(forward(theirs), _logits(pm, PADDED_IDS, MASK), MASK)
    # ours written with save_adapter, read by PeftModel
    ad = _our_adapters(ours)
    with pytest.warns(UserWarning, match="vLLM cannot serve ranks"):
        lpeft.save_adapter(tmp_path / "ours", ad, ours)
    loaded = peft.PeftModel.from_pretrained(_fresh_torch(name, directory), tmp_path / "ours").eval()
    expected = np.asarray(forward(ad))
    assert np.abs(expected - np.asarray(ours.fn(ours.params, PADDED_IDS, MASK))).max() > 1e-2
    _assert_match(expected, _logits(loaded, PADDED_IDS, MASK), MASK)
    # the LoRA merged into the weights and exported: plain transformers reads it
    merged = M.save_pretrained(ours, lora_jax.merge(ours.params, ad), tmp_path / "merged")
    _assert_match(expected, _logits(_fresh_torch(name, merged), PADDED_IDS, MASK), MASK)


def test_attention_soft_cap_matches_transformers_eager_attention():
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 6, 4, 8)) * 3.0
    k = jax.random.normal(keys[1], (2, 6, 2, 8)) * 3.0
    v = jax.random.normal(keys[2], (2, 6, 2, 8))
    allowed = np.tril(np.ones((6, 6), bool))[None].repeat(2, 0)
    ours = grouped_attention(q, k, v, jnp.asarray(allowed), scale=0.2, softcap=2.0)
    stub = type("Stub", (), {"num_key_value_groups": 2, "training": False, "head_dim": 8})()
    to_t = lambda x: torch.tensor(np.asarray(x)).transpose(1, 2)  # [B,T,H,K] -> [B,H,T,K]
    additive = torch.tensor(np.where(allowed, 0.0, -1e30)[:, None], dtype=torch.float32)
    theirs, _ = eager_attention_forward(stub, to_t(q), to_t(k), to_t(v), additive, scaling=0.2,
                                        softcap=2.0)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=ATOL, rtol=0)
    plain = grouped_attention(q, k, v, jnp.asarray(allowed), scale=0.2)
    assert np.abs(np.asarray(plain) - np.asarray(ours)).max() > 0.05


@pytest.mark.parametrize("model_type,extra,message", [
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "never applies it"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("qwen3", dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
    ("gemma3_text", dict(layer_types=["full_attention", "local"]), "layer_types needs 2 entries"),
])
def test_unsupported_family_options_are_refused(model_type, extra, message):
    hf = dict(SMALL, num_hidden_layers=2, model_type=model_type, **extra)
    with pytest.raises(LoraError, match=message):
        M.LlamaConfig.from_hf(hf)


def test_family_configs_go_through_the_ablation_runner(tmp_path):
    """configs/lm/{qwen3,gemma3}_tiny.py: a sweep may switch causal_lm.family (a declared field),
    each run passes the config rules, and the task builds the named family; a wrong one is refused."""
    from configs.lm import gemma3_tiny, qwen3_tiny
    from lora_jax.ablate import apply_overrides
    from lora_jax.config_check import check_config
    from lora_jax.tasks.causal_lm import hf_config

    assert gemma3_tiny.get_config("smoke").causal_lm.family == "gemma3"
    run = qwen3_tiny.get_config("smoke")
    types = {"llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3_text"}
    for family, model_type in types.items():
        config = apply_overrides(run, {"causal_lm.family": family, "lora.rank": 4})
        check_config(config, str(tmp_path / family))
        built = M.LlamaConfig.from_hf(hf_config(config.causal_lm))
        assert built.model_type == model_type and built.qk_norm == (family != "llama")
    with pytest.raises(LoraError, match=r"causal_lm\.family='gpt2'; expected one of 'llama', 'qwen3'"):
        check_config(apply_overrides(run, {"causal_lm.family": "gpt2"}), str(tmp_path / "bad"))
