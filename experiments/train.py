"""Train LoRA (or fully fine-tune) from a config file.

    python -m experiments.train --config=configs/r16.py [--config.lora.rank=8] [--workdir=DIR]

The same command runs on one CPU, many local devices, or many hosts (pass the
--coordinator_address/--num_processes/--process_id flags, or let JAX read them from the cluster's
environment). All the work is in `lora_jax.trainer.train_and_evaluate`.
"""

import os
import sys

import ml_collections
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
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax reports every file it writes at INFO
    # With OCDBT off (see lora_jax/checkpoint.py) Orbax warns at each save that it has nothing to merge.
    logging.get_absl_handler().addFilter(lambda record: "Skipping merge of OCDBT" not in record.getMessage())

    from lora_jax.config_check import check_config
    from lora_jax.errors import LoraError
    from lora_jax.preemption import TrainingStopped

    config_path = flags.FLAGS["config"].config_filename
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):  # a file that failed to load
        print(f"error: cannot load config file {config_path} (expected a .py file with get_config)",
              file=sys.stderr)
        sys.exit(1)
    try:
        check_config(config, workdir)  # the trainer checks too; here it refuses before the heavy imports
        import jax

        from lora_jax import cluster
        from lora_jax.trainer import train_and_evaluate

        cluster.initialize(_COORD.value, _NPROC.value, _PID.value)
        result = train_and_evaluate(config, workdir)
    except TrainingStopped as e:  # a polite stop, not a failure: the shell's 128 + signal number
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print(f"done: {result['steps']} steps; final {result['eval']}; outputs in {workdir}")


def parse_flags(argv):
    """absl parsing, but a bad flag or config override is one line and exit 1, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, or the AttributeError/KeyError of a bad override
        text = " ".join(str(e).encode().decode("unicode_escape").split())
        text = text[1:-1] if text[:1] == text[-1:] == "'" else text
        print(f"error: bad flag or config override: {text}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
