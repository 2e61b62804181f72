"""benchmarks.plan with --quant: the QLoRA step's quantised base, as built and as compiled,
against a hand count from the model's shapes alone (4 bits a weight, a uint8 absmax code per 64,
a float32 per 256 blocks and an offset per weight; the rest dense in bf16)."""

from __future__ import annotations

import math

import pytest

from benchmarks import plan


def hand_count(preset: dict, bytes_per_dense: int = 2) -> tuple[int, int]:
    """(bytes of the quantised base, number of quantised weights), written out independently of
    benchmarks.plan: each layer's seven linear kernels NF4 with double quantisation."""
    D, F, L, V = (preset[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    head_dim = D // preset["num_attention_heads"]
    kv = preset["num_key_value_heads"] * head_dim
    sizes = [D * D, D * kv, D * kv, D * D, D * F, D * F, F * D]
    quantised = sum(math.ceil(n / 2) + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) + 4 for n in sizes)
    dense = (V * D * 2 + D * (2 * L + 1)) * bytes_per_dense
    return L * quantised + dense, L * sum(sizes)


@pytest.fixture(scope="module")
def tiny():
    return plan.plan("tiny", {"data": 1}, rank=4, batch=1, seq=16, quant="nf4", scan=False)


@pytest.mark.slow  # compiles three tiny train steps (~15 s quiet, more on a busy machine)
def test_quantised_base_as_built_is_the_hand_count(tiny):
    want, _ = hand_count(plan.PRESETS["tiny"])
    assert tiny["qlora"]["hand"]["weights"] == want
    assert tiny["hand_quantized_base_bytes"] == want


@pytest.mark.slow
def test_compiled_qlora_step_holds_the_quantised_base(tiny):
    q, lora = tiny["qlora"], tiny["lora"]
    # XLA's own argument bytes: the quantised base plus adapters and Adam's moments, nothing dense
    assert abs(q["argument_bytes"] / q["hand"]["state_bytes"] - 1) < 0.01
    assert q["trainable_params"] == lora["trainable_params"]
    dense_linears = lora["hand"]["weights"] - q["hand"]["weights"]
    assert lora["argument_bytes"] - q["argument_bytes"] == pytest.approx(dense_linears, rel=0.01)


@pytest.mark.parametrize("model", ["llama3-8b", "llama3-70b"])
def test_nf4_costs_4127_bits_a_quantised_weight(model):
    from lora_jax.models import build_module

    preset = plan.PRESETS[model]
    want, n = hand_count(preset)
    assert plan.quantized_base_bytes(build_module(plan.hf_config(model))[2], "nf4", 2) == want
    dense, _ = hand_count({**preset, "num_hidden_layers": 0})
    norms = 2 * preset["hidden_size"] * 2 * preset["num_hidden_layers"]
    assert 4.126 < 8 * (want - dense - norms) / n < 4.128
