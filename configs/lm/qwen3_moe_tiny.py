"""LoRA on a tiny random-weight Qwen3-MoE decoder: attention and every expert, offline.

    python -m experiments.train --config=configs/lm/qwen3_moe_tiny.py [--workdir=runs/lm_qwen3_moe_tiny]

No download and no pretraining: the base (2 layers, width 64, byte vocabulary, each MLP 4 experts
of width 128 with 2 routed per token) is drawn at random from causal_lm.family's config
(model.path ""), then adapted to pydoc's help topics with LoRA r=8 on q_proj, v_proj and both
expert weights (A [experts, in, r], B [experts, r, out] per layer; lora_jax/expert_rules.py).
"""

from configs.lm import qwen3_tiny


def get_config(arg: str | None = None):
    c = qwen3_tiny.get_config(arg)
    c.causal_lm.family = "qwen3_moe"
    c.lora.targets = r".*/(q_proj|v_proj)/kernel|.*/experts/(gate_up_proj|down_proj)"
    return c
