"""Adapt the pretrained causal_lm base to pydoc's help topics by full fine-tuning.

    python -m experiments.train --config=configs/lm/full.py [--workdir=runs/lm_full]

Same data, steps and evaluation as configs/lm/lora.py; every weight trains, at a lower rate.
"""

from configs.lm import lora


def get_config(arg: str | None = None):
    c = lora.get_config(arg)
    c.method = "full"
    c.optimizer.lr = 5e-4
    return c
