"""XLA compile options the project sets for a model family where jaxlib's default is slower.

They are passed per compilation (`jax.jit(..., compiler_options=...)`), never through XLA_FLAGS,
so they reach only that model's programs: a decoder compiled in the same process keeps
jaxlib's defaults.

- BERT family on CPU: YNNPACK fusions off. jaxlib 0.10's XLA:CPU hands the encoder step's dots
  and reductions to YNNPACK fusions; without them the MiniLM LoRA step runs at 0.81-0.85x the
  time, while the Llama steps and large plain matmuls are faster with them
  (WORKSPACE.md, "The CPU step at equal math"; `python -m benchmarks.xla_flags`).
"""

from __future__ import annotations

import jax

_CPU = {"bert": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def compiler_options(family: str, platform: str | None = None) -> dict[str, str]:
    """The options for `family`'s programs on `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return dict(_CPU.get(family, {})) if platform == "cpu" else {}
