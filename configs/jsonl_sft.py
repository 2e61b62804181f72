"""Supervised fine-tuning of a Llama-family decoder on your .jsonl ({"prompt", "completion"} per line).

    python -m experiments.train --config=configs/jsonl_sft.py --config.model.path=DIR \
        --config.jsonl.train=data/train.jsonl --config.jsonl.eval=data/dev.jsonl --workdir=runs/sft

The loss covers completion tokens only; held-out metrics are completion loss and perplexity.
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.task = "jsonl_sft"
    c.model.path = ""  # no default decoder ships with the package; pass an HF directory or hub id
    c.lora.targets = r".*/(q_proj|v_proj)/kernel"
    c.optimizer.lr = 2e-4
    c.batch_size = 16
    c.epochs = 2.0
    c.log_every = 20
    c.ckpt_every = 200
    c.jsonl.max_len = 512
    c.jsonl.eval_batch = 16
    c = base.variant(c, arg)
    if arg == "smoke":
        c.jsonl.max_eval = 64
    return c
