"""Planted-rank teacher/student task: LoRA should recover a rank-k update of a random MLP.

    python -m experiments.train --config=configs/planted.py --workdir=runs/planted
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.task = "planted_rank"
    c.model.path = ""
    c.lora.targets = r"layers_\d+/kernel"
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.optimizer.lr = 1e-2
    c.batch_size = 64
    c.steps = 300
    c.log_every = 25
    c.eval_every = 100
    c.ckpt_every = 100
    return base.variant(c, arg)
