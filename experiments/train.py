"""Train LoRA (or fully fine-tune) from a config file.

    python -m experiments.train --config=configs/r16.py [--config.lora.rank=8] [--workdir=DIR]

The same command runs on one CPU, many local devices, or many hosts (pass the
--coordinator_address/--num_processes/--process_id flags, or let JAX read them from the cluster's
environment). All the work is in `lora_jax.trainer.train_and_evaluate`.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r16.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
    # With OCDBT off (see lora_jax/checkpoint.py) Orbax warns at each save that it has nothing to merge.
    logging.get_absl_handler().addFilter(lambda record: "Skipping merge of OCDBT" not in record.getMessage())

    if _NPROC.value and _NPROC.value > 1:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    from lora_jax.errors import LoraError
    from lora_jax.trainer import train_and_evaluate

    config_path = flags.FLAGS["config"].config_filename
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    try:
        result = train_and_evaluate(_CONFIG.value, workdir)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(f"done: {result['steps']} steps; final {result['eval']}; outputs in {workdir}")


if __name__ == "__main__":
    app.run(main)
