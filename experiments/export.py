"""Export a training run as a PEFT adapter directory or as merged full weights (safetensors).

    python -m experiments.export --workdir=runs/r16 --to=peft --out=exports/r16_peft
    python -m experiments.export --workdir=runs/r16 --to=merged --out=exports/r16_merged

`peft`: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained or vLLM.
`merged`: config.json + model.safetensors (+ tokenizer) of base + ΔW, for transformers'
from_pretrained; for a method=full run, the fine-tuned weights. A finished run exports its
adapter/ (finetuned/); an unfinished one its latest checkpoint. The model is rebuilt from the
run's config.json. Bad input prints one `error: ...` line, exits 1 and writes nothing. All the
work is in `lora_jax.run_export.export_run`.
"""

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
_TO = flags.DEFINE_string("to", None, "What to write: peft or merged.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).")


def run(workdir: str | None, to: str | None, out: str | None) -> int:
    """Export and print one line; on bad input print `error: ...` and return 1."""
    from lora_jax.errors import LoraError
    from lora_jax.run_export import FORMS, export_run

    missing = [name for name, value in (("workdir", workdir), ("to", to), ("out", out)) if not value]
    try:
        if missing:
            raise LoraError(f"give --{', --'.join(missing)} (--to is one of {', '.join(FORMS)})")
        print(export_run(workdir, to, out))
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; expected only --workdir, --to, --out",
              file=sys.stderr)
        sys.exit(1)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax reports every file it reads at INFO
    sys.exit(run(_WORKDIR.value, _TO.value, _OUT.value))


def parse_flags(argv):
    """absl parsing, but an unknown flag is one line and exit 1, not a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: bad flag: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
