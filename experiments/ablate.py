"""Run one ablation sweep and write its tables and plots.

    python -m experiments.ablate --config=configs/ablations/rank_targets.py --workdir=runs/ablate/rank_targets
    python -m experiments.ablate --config=configs/ablations/planted_rank.py:smoke --workdir=/tmp/planted

Writes DIR/results.csv, DIR/results.md and DIR/*.png; each run lives in DIR/runs/<name>. Rerunning
skips finished runs and resumes an interrupted one, so a killed sweep is continued by the same command.
`--config.run.<field>=...` changes every run of the sweep (e.g. --config.run.steps=20).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Ablation config file (configs/ablations/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (default: runs/ablate/<config name>).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild tables and plots from finished runs.")


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
    logging.get_absl_handler().addFilter(lambda record: "Skipping merge of OCDBT" not in record.getMessage())
    from lora_jax.ablate import run_ablation
    from lora_jax.errors import LoraError

    if _CONFIG.value is None:
        print("error: pass --config=configs/ablations/<name>.py[:smoke]", file=sys.stderr)
        sys.exit(1)
    config_path = flags.FLAGS["config"].config_filename
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    workdir = _WORKDIR.value or os.path.join("runs", "ablate", name)
    train = _refuse_training if _REPORT_ONLY.value else None
    try:
        result = run_ablation(_CONFIG.value, workdir, train=train)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"done: {len(result['records'])} runs; {os.path.join(workdir, 'results.md')}, results.csv, "
        f"{', '.join(result['images'])}"
    )


def _refuse_training(config, workdir):
    from lora_jax.errors import LoraError

    raise LoraError(f"--report_only: run {workdir} is not finished")


if __name__ == "__main__":
    app.run(main)
