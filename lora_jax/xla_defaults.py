"""XLA:CPU settings the project makes for its users, so a faster step needs no flag they would not know.

Measured on the MiniLM LoRA step (benchmarks/results/xla_flags.md): with jaxlib 0.10.2, XLA:CPU
hands dots and reductions to YNNPACK fusions by default, which run this step ~13% slower than
XLA's own emitters on a 2-core AVX2 machine. Applied only to the jaxlib it was measured with
(an unknown flag is fatal to XLA), only where the user has not set the flag, and only before the
first backend starts (on import of lora_jax); `LORA_JAX_XLA_DEFAULTS=0` leaves XLA_FLAGS alone.
"""

from __future__ import annotations

import os

MEASURED_JAXLIB = "0.10.2"
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}  # "": no YNNPACK fusions


def apply_defaults(environ: dict | None = None, jaxlib_version: str | None = None) -> str:
    """Append the project's XLA:CPU flags to XLA_FLAGS; returns the resulting XLA_FLAGS."""
    env = os.environ if environ is None else environ
    if jaxlib_version is None:
        try:
            from jaxlib import version as jaxlib_version_module
        except ImportError:
            return env.get("XLA_FLAGS", "")
        jaxlib_version = jaxlib_version_module.__version__
    flags = env.get("XLA_FLAGS", "")
    if env.get("LORA_JAX_XLA_DEFAULTS", "1") == "0" or jaxlib_version != MEASURED_JAXLIB:
        return flags
    for name, value in CPU_FLAGS.items():
        if name not in flags:
            flags = f"{flags} {name}={value}".strip()
    env["XLA_FLAGS"] = flags
    return flags


apply_defaults()  # on import: lora_jax/__init__.py imports this module before anything else
