"""MoE decoders (Qwen3-MoE, Mixtral) against transformers, and LoRA on their expert weights.

Tiny random checkpoints written by transformers' own save_pretrained (per-expert tensors, as on
the hub); weights drawn large enough that tokens spread over different experts.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors import safe_open  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import peft as lpeft  # noqa: E402
from lora_jax.errors import LoraError  # noqa: E402
from lora_jax.generate import generate  # noqa: E402
from lora_jax.models import load, save_pretrained  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts_per_tok=2,
              pad_token_id=0, eos_token_id=None, bos_token_id=None)
FAMILIES = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=4, moe_intermediate_size=16, norm_topk_prob=True)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4)),
}
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
IDS = np.random.RandomState(0).randint(1, 64, (2, 7))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (config_cls, model_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        hf = model_cls(config_cls(**COMMON, **extra)).eval()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                gain = "norm" in pname
                p.copy_(torch.randn_like(p) * (0.1 if gain else 0.3) + (1.0 if gain else 0.0))
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        out[name] = (path, hf)
    return out


def _logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    want = _logits(hf, IDS)
    for scan in (False, True):
        model = load(path, scan_layers=scan)
        got = np.asarray(jax.jit(model.fn)(model.params, jnp.asarray(IDS)))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 1.0  # logits of real size, not a near-zero model


def test_routing_spreads_tokens_over_experts(checkpoints):
    path, hf = checkpoints["qwen3_moe"]
    h = hf.model.embed_tokens(torch.tensor(IDS))
    gate = hf.model.layers[0].mlp.gate
    _, _, chosen = gate(hf.model.layers[0].input_layernorm(h).reshape(-1, 32))
    assert len(set(chosen.flatten().tolist())) == 4  # every expert gets tokens


def test_greedy_generation_matches_transformers(checkpoints):
    path, hf = checkpoints["qwen3_moe"]
    prompts = [list(IDS[0, :5]), list(IDS[1, :5])]
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(prompts), attention_mask=torch.ones(2, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=6, pad_token_id=0)
    want = [list(map(int, row)) for row in out[:, 5:]]
    model = load(path, scan_layers=True)
    assert generate(model, prompts, max_new_tokens=6, eos_ids=[]) == want


@pytest.fixture(scope="module")
def expert_lora(checkpoints):
    path, _ = checkpoints["qwen3_moe"]
    model = load(path)
    spec = lora_jax.LoraSpec(targets=r".*/(q_proj/kernel|mlp/gate/kernel|experts/gate_up_proj"
                             r"|experts/down_proj)", rank=2, alpha=4.0)
    init = jax.jit(lambda key, p: lora_jax.init(key, model.fn, p, jnp.asarray(IDS), spec=spec))
    adapters = init(jax.random.key(0), model.params)
    rng = np.random.RandomState(1)  # B away from zero, so every branch shows in the logits
    adapters = jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), adapters)
    return model, adapters


def test_expert_adapters_are_stacked_per_expert(expert_lora):
    model, adapters = expert_lora
    ad = adapters["params"]["model"]["layers_0"]["mlp"]["experts"]
    assert ad["gate_up_proj"].a.shape == (4, 32, 2) and ad["gate_up_proj"].b.shape == (4, 2, 32)
    assert ad["down_proj"].a.shape == (4, 16, 2) and ad["down_proj"].b.shape == (4, 2, 32)


def test_factored_equals_merged_and_gradients_reach_only_a_and_b(expert_lora, tmp_path):
    model, adapters = expert_lora
    ids = jnp.asarray(IDS)
    forward = lambda a, p: lora_jax.apply(model.fn, p, a, ids)

    @jax.jit  # one compile for all four
    def run(a, p):
        grads = jax.grad(lambda a: jnp.sum(forward(a, p) ** 2))(a)
        merged = lora_jax.merge(p, a)
        return forward(a, p), model.fn(merged, ids), model.fn(p, ids), grads, merged

    factored, merged, base, grads, merged_params = run(adapters, model.params)
    np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), atol=1e-5, rtol=0)
    assert float(jnp.abs(factored - base).max()) > 1e-2
    jaxpr = str(jax.make_jaxpr(forward)(adapters, model.params))
    assert jaxpr.count("ragged_dot_general") == 2 * 2 * 3  # layers x projections x (W, A, B)
    leaves = lora_jax.adapters.adapter_items(grads)
    assert len(leaves) == 8 and all(float(jnp.abs(ad.a).max()) > 0 and float(jnp.abs(ad.b).max()) > 0
                                    for _, ad in leaves)  # every expert stack's A and B, nothing else
    assert len(jax.tree.leaves(grads)) == 2 * len(leaves)
    # the merged model exports as transformers 5 holds experts, and transformers reads it
    save_pretrained(model, merged_params, tmp_path / "merged")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_logits(theirs, IDS), np.asarray(merged), atol=1e-4, rtol=0)


def test_mixed_adapter_batch_on_experts_refused_in_one_line(expert_lora):
    model, adapters = expert_lora
    stacked = lora_jax.stack_adapters([adapters, adapters])
    with pytest.raises(LoraError, match="mixed-adapter batch .* cannot reach the expert weight"):
        jax.eval_shape(lambda a: lora_jax.apply(model.fn, model.params, a, jnp.asarray(IDS),
                                                adapter_index=jnp.asarray([0, 1])), stacked)


def test_peft_target_parameters_both_ways(checkpoints, tmp_path):
    path, _ = checkpoints["qwen3_moe"]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                             target_parameters=EXPERT_TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path), config).eval()
    want = _logits(theirs, IDS)
    theirs.save_pretrained(tmp_path / "peft")
    model = load(path)
    adapters = lpeft.load_adapter(tmp_path / "peft", model)
    got = np.asarray(jax.jit(lambda a: lora_jax.apply(model.fn, model.params, a, jnp.asarray(IDS)))(adapters))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(got - _logits(checkpoints["qwen3_moe"][1], IDS)).max() > 1e-2
    lpeft.save_adapter(tmp_path / "ours", adapters, model)
    back = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                          tmp_path / "ours").eval()
    np.testing.assert_allclose(_logits(back, IDS), want, atol=1e-4, rtol=0)
    # a scanned model reads the same file as per-layer stacks, and writes it back unchanged
    scanned = load(path, scan_layers=True)
    stacked = lpeft.load_adapter(tmp_path / "peft", scanned)
    for layer in range(2):
        for name in ("gate_up_proj", "down_proj"):
            one = adapters["params"]["model"][f"layers_{layer}"]["mlp"]["experts"][name]
            both = stacked["params"]["model"]["layers"]["mlp"]["experts"][name]
            np.testing.assert_array_equal(np.asarray(both.a[layer]), np.asarray(one.a))
            np.testing.assert_array_equal(np.asarray(both.b[layer]), np.asarray(one.b))
    lpeft.save_adapter(tmp_path / "scanned", stacked, scanned)
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "np") as f, \
            safe_open(str(tmp_path / "scanned" / "adapter_model.safetensors"), "np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
            np.testing.assert_array_equal(f.get_tensor(key), g.get_tensor(key))


def test_plan_of_a_moe_lora_step_runs():
    from benchmarks import plan

    res = plan.plan("tiny-moe", {"fsdp": 2}, rank=4, batch=2, seq=16, targets="moe", full=False)
    lora = res["lora"]
    assert lora["total_bytes"] > 0 and "full" not in res
    # per layer: A [E, in, r] and B [E, r, out] of gate_up [4, 64, 64] and down [4, 32, 64], plus q/k/v/o
    experts = 4 * (64 * 4 + 4 * 64) + 4 * (32 * 4 + 4 * 64)
    attention = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64)])
    assert lora["trainable_params"] == 2 * (experts + attention)


def test_layouts_the_block_does_not_follow_are_refused_in_one_line(checkpoints, tmp_path):
    from lora_jax.models.moe import MoeConfig

    hf = {**COMMON, "model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 16}
    with pytest.raises(LoraError, match="dense layers among the MoE ones"):
        MoeConfig.from_hf({**hf, "mlp_only_layers": [1]})
    with pytest.raises(LoraError, match="num_experts_per_tok 5 must be in 1..num_experts"):
        MoeConfig.from_hf({**hf, "num_experts_per_tok": 5})
    path, _ = checkpoints["mixtral"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text().replace(
        '"num_local_experts": 4', '"num_local_experts": 3'))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(LoraError, match=r"experts.down_proj' .* has shape \(4, 48, 32\) in "
                                        r"\[experts, in, out\]; config.json implies \(3, 48, 32\)"):
        load(tmp_path)
