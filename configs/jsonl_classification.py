"""Text classification on your own .jsonl files ({"text": ..., "label": ...} per line).

    python -m experiments.train --config=configs/jsonl_classification.py \
        --config.jsonl.train=data/train.jsonl --config.jsonl.eval=data/dev.jsonl --workdir=runs/cls

Works with BERT-family encoders (the default, packaged MiniLM) and Llama-family decoders
(--config.model.path=DIR); the targets regex covers both families' attention projections.
The new head params/cls_head is trained in full beside the adapters (lora.train_also).
"""

from configs import base


def get_config(arg: str | None = None):
    c = base.get_config()
    c.task = "jsonl_classification"
    c.lora.targets = r".*/(query|value|q_proj|v_proj)/kernel"
    c.lora.train_also = r"params/cls_head/(kernel|bias)"
    c.optimizer.lr = 1e-3
    c.batch_size = 32
    c.epochs = 3.0
    c.log_every = 20
    c.ckpt_every = 200
    c = base.variant(c, arg)
    if arg == "smoke":
        c.jsonl.max_eval = 256
    return c
