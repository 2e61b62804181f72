"""Adapt the pretrained causal_lm base to pydoc's English help topics with LoRA r=16.

    python -m experiments.pretrain --config=configs/lm/pretrain.py     # once; cached
    python -m experiments.train --config=configs/lm/lora.py [--workdir=runs/lm_lora]

Reports eval/target_loss|ppl (learning) and eval/source_loss|ppl (forgetting) at step 0 (the
base) and at the end. `:smoke` adapts the `pretrain.py:smoke` base for 20 steps.
"""

import ml_collections

from configs import base
from configs.lm import pretrain
from lora_jax.pretrain import base_dir


def get_config(arg: str | None = None):
    c = base.get_config()
    c.task = "causal_lm"
    c.method = "lora"
    made_by = pretrain.get_config(arg)
    c.model.path = base_dir(made_by)
    c.causal_lm = ml_collections.ConfigDict(made_by.causal_lm.to_dict())  # same data and windows
    c.causal_lm.train_on = "target"
    c.causal_lm.base_config = "configs/lm/pretrain.py" + (f":{arg}" if arg else "")
    c.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 20
    c.batch_size = 16
    c.steps = 300
    c.log_every = 25
    c.ckpt_every = 100
    c = base.variant(c, arg)
    if arg == "smoke":
        c.causal_lm.eval_windows = 32
    return c
