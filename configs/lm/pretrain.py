"""Pretrain the causal_lm base: a byte-level Llama (~1.8M params) on the stdlib's .py sources.

    python -m experiments.pretrain --config=configs/lm/pretrain.py          # ~10 CPU-minutes
    python -m experiments.pretrain --config=configs/lm/pretrain.py:smoke    # 20 steps, a minute

The result is an HF directory (config.json, model.safetensors, tokenizer.json) at
lora_jax.pretrain.base_dir(config), ~/.cache/lora_jax/causal_lm_base-<hash of the weight-deciding
fields>; a second run finds it and returns at once. configs/lm/lora.py and full.py adapt it.

Measured (1000 steps, 2 cores shared with other jobs, load ~10): 22 min wall, 11.6 CPU-min;
held-out loss (nats/byte) source 1.42, target 1.84. Adapting 300 steps to the target:
LoRA r=16 target 1.84 -> 1.47, source 1.42 -> 1.74; full target 1.84 -> 1.44, source -> 1.70.
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.task = "causal_lm"
    c.method = "full"
    c.model.path = ""  # made from the causal_lm.hidden_size/... fields with from_config
    c.causal_lm.train_on = "source"
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.end_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.01
    c.batch_size = 16
    c.steps = 1000
    c.log_every = 50
    c.ckpt_every = 250
    c = base.variant(c, arg)
    if arg == "smoke":
        c.causal_lm.eval_windows = 32
    return c
