"""Pretrain the causal_lm base from scratch and export it as an HF directory (cached).

    python -m experiments.pretrain --config=configs/lm/pretrain.py [--workdir=DIR]

Prints the base directory; model.path of configs/lm/lora.py and full.py points there. A base that
already exists is reused; an interrupted run resumes from its checkpoints (default workdir:
<base dir>.run). All the work is in `lora_jax.pretrain.pretrain`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm/pretrain.py", "Pretrain config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (default: <base dir>.run).")


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
    logging.get_absl_handler().addFilter(lambda record: "Skipping merge of OCDBT" not in record.getMessage())
    from lora_jax.errors import LoraError
    from lora_jax.pretrain import base_dir, is_complete, pretrain

    config = _CONFIG.value
    cached = is_complete(base_dir(config))
    try:
        out = pretrain(config, _WORKDIR.value)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{'reused' if cached else 'saved'} causal_lm base: {out}")


if __name__ == "__main__":
    app.run(main)
