"""LoRA on a tiny random-weight Qwen3 decoder (per-head q/k norms): the family's path, offline.

    python -m experiments.train --config=configs/lm/qwen3_tiny.py [--workdir=runs/lm_qwen3_tiny]

No download and no pretraining: the base (2 layers, width 64, byte vocabulary) is drawn at
random from causal_lm.family's config (model.path ""), then adapted to pydoc's help topics with
LoRA r=8 on q_proj and v_proj, the family's default targets. configs/lm/gemma3_tiny.py is the
same for Gemma 3. Measured (100 steps, CPU): held-out target loss (nats/byte) 5.43 -> 5.19 for
Qwen3, 5.56 -> 5.18 for Gemma 3 (a random base starts near ln 257 = 5.55).
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.task = "causal_lm"
    c.method = "lora"
    c.model.path = ""  # a random base from the causal_lm block
    c.causal_lm.family = "qwen3"
    c.causal_lm.train_on = "target"
    c.causal_lm.hidden_size = 64
    c.causal_lm.intermediate_size = 128
    c.causal_lm.layers = 2
    c.causal_lm.heads = 4
    c.causal_lm.seq_len = 64
    c.causal_lm.eval_windows = 64
    c.causal_lm.eval_batch = 32
    c.lora.targets = r".*/(q_proj|v_proj)/kernel"
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 10
    c.batch_size = 16
    c.steps = 100
    c.log_every = 10
    c.ckpt_every = 50
    c = base.variant(c, arg)
    if arg == "smoke":
        c.causal_lm.eval_windows = 16
    return c
