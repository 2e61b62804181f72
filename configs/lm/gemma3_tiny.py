"""LoRA on a tiny random-weight Gemma 3 text decoder: the family's path, offline.

    python -m experiments.train --config=configs/lm/gemma3_tiny.py [--workdir=runs/lm_gemma3_tiny]

configs/lm/qwen3_tiny.py with causal_lm.family "gemma3": (1 + w) RMS norms around attention and
MLP, a sqrt(width) embedding scale, GeGLU, and alternating sliding-window (16 of the 64 tokens)
and global layers with their own RoPE bases; LoRA r=8 on q_proj and v_proj.
"""

from configs.lm import qwen3_tiny


def get_config(arg: str | None = None):
    c = qwen3_tiny.get_config(arg)
    c.causal_lm.family = "gemma3"
    return c
