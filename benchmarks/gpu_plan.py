"""What `benchmarks.gpu` measures: model shapes, run settings, FLOP counts and time estimates.

The estimates (seconds on one H200, from the 2026 H200 run: 1.1B scanned compile + init ~28 s,
0.5-0.7 s/step) decide which items still fit the run's budget and what `--dry` prints.
"""

from __future__ import annotations

import dataclasses

# TinyLlama-1.1B and Llama-3-8B: the shapes only (random bf16 weights; speed does not care).
SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
SMALL_SHAPES = {  # the same two roles in CPU size: every code path, seconds not minutes
    "1.1b": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=512, rope_theta=10000.0),
    "8b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1024, rope_theta=500000.0),
}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
FLOP_CONVENTION = (
    "analytic matmul FLOPs of one LoRA step: forward 2N per token (N = matmul weights incl. the LM "
    "head), activation gradients 2N, adapter forward + both gradients 6 per adapter weight, and "
    "attention QK^T + PV counted dense (causal attention NOT halved) at 3x its forward; "
    "recomputation (remat / gradient checkpointing) not counted; MFU against the chip's dense bf16 "
    "peak (989 TFLOP/s for H100/H200)")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Run settings of one mode (device or --small)."""

    small: bool
    seq: int
    batch_1b: int
    batches_8b: tuple[int, ...]  # candidates, largest first: the batch search tries them in order
    steps: dict  # model -> (warmup, timed)
    budget_s: float
    rank: int = 16
    # --small only: simulated device limits, so that both batch searches step down on CPU (which
    # reports no memory limit) as they would on a GPU: lora_jax refuses, PEFT runs out of memory
    simulate_jax_max_batch: int | None = None
    simulate_torch_max_batch: int | None = None

    def shape(self, model: str) -> dict:
        return (SMALL_SHAPES if self.small else SHAPES)[model]


DEVICE_PLAN = Plan(small=False, seq=2048, batch_1b=8, batches_8b=(16, 8, 4, 2, 1),
                   steps={"1.1b": (2, 6), "8b": (1, 2)}, budget_s=450.0)
SMALL_PLAN = Plan(small=True, seq=64, batch_1b=2, batches_8b=(4, 2, 1),
                  steps={"1.1b": (1, 1), "8b": (1, 1)}, budget_s=300.0,
                  simulate_jax_max_batch=2, simulate_torch_max_batch=1)


def hf_config(shape: dict) -> dict:
    """An HF Llama config.json dict for a shape (both sides build from it)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False,
            "use_cache": False, **shape}


def model_flops(shape: dict, batch: int, seq: int, rank: int) -> dict:
    """FLOP_CONVENTION's counts per step, plus full fine-tuning and a causal-halved variant."""
    D, F, L, V = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                     "vocab_size"))
    kv = D // shape["num_attention_heads"] * shape["num_key_value_heads"]
    lin = L * (2 * D * D + 2 * D * kv + 3 * D * F) + D * V
    tok = batch * seq
    lin_fwd, att_fwd = 2.0 * tok * lin, 4.0 * tok * seq * D * L
    adapter = L * rank * ((D + D) * 2 + (D + kv) * 2 + 2 * (D + F) + (F + D))
    lora = 2 * lin_fwd + 3 * att_fwd + 6.0 * tok * adapter
    return {"params": lin + D * V, "adapter_params": adapter, "forward": lin_fwd + att_fwd,
            "lora": lora, "lora_causal_halved": lora - 1.5 * att_fwd, "full": 3 * (lin_fwd + att_fwd)}


# Seconds on one H200 (estimates; the run records what each item really took).
_COMPILE_S = {("1.1b", True): 25, ("1.1b", False): 70, ("8b", True): 40, ("8b", False): 120}
_INIT_S = {"1.1b": 2, "8b": 8}  # weights drawn on the device, no forward compiled
_STEP_S = {"1.1b": 0.7, "8b": 0.35}  # 1.1B: per step at batch 8; 8B: per sequence of 2,048
_WORKER_START_S = {"jax": 10, "torch": 5}  # backend start at the first item (imports overlap)


def step_estimate(model: str, batch: int) -> float:
    return _STEP_S[model] * (1 if model == "1.1b" else batch)


def estimate(plan: Plan, item: dict, first_in_worker: bool, new_params: bool) -> float:
    """Expected seconds for one item; --small items take a few seconds each."""
    if plan.small:
        return 8.0
    model, batch = item["model"], item["batches"][0]
    warm, timed = plan.steps[model]
    steps_s = (warm + timed) * step_estimate(model, batch)
    start = _WORKER_START_S[item["side"]] if first_in_worker else 0
    if item["side"] == "jax":
        return start + (_INIT_S[model] if new_params else 0) + _COMPILE_S[(model, item["scan"])] + steps_s
    build = {"1.1b": 8, "8b": 30}[model] if new_params else 0
    return start + build + steps_s
