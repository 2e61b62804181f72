"""Ablation sweeps: one config (a base run + a list of overrides + an analysis kind) -> one command.

    run_ablation(config, workdir) trains every run of `config.sweep` not yet finished (in
    workdir/runs/<name>), then writes workdir/results.csv, workdir/results.md and workdir/*.png.

Config fields (see configs/ablations/*.py): `kind` (an analysis in ANALYSES), `title`,
`description`, `run` (a full training config), `sweep` (list of {"name", "tags", "dotted.key": value}),
`metric` / `higher_is_better` (the headline eval key) and `analysis` (kind-specific options).
"""

from __future__ import annotations

import os
from typing import Any

from lora_jax.ablate import kinds_curves, kinds_forgetting, kinds_rank, kinds_variants, kinds_weights
from lora_jax.ablate.common import Metric
from lora_jax.ablate.report import run_rows, runs_table, write_csv, write_markdown
from lora_jax.ablate.sweep import RunRecord, apply_overrides, run_name, run_sweep
from lora_jax.errors import LoraError

ANALYSES = {
    "rank_targets": kinds_rank.rank_targets,
    "scaling": kinds_curves.scaling,
    "planted_rank": kinds_rank.planted_rank,
    "loraplus_init": kinds_curves.loraplus_init,
    "subspace": kinds_weights.subspace,
    "amplification": kinds_weights.amplification,
    "forgetting": kinds_forgetting.forgetting,
    "variants": kinds_variants.variants,
}

__all__ = ["ANALYSES", "RunRecord", "apply_overrides", "report", "run_ablation", "run_name", "run_sweep"]


def report(config: Any, records: list[RunRecord], workdir: str) -> dict[str, Any]:
    """Tables and plots from finished runs (no training): results.csv, results.md, *.png."""
    metric = Metric(config.metric, config.higher_is_better)
    result = ANALYSES[config.kind](config.analysis, metric, records, workdir)
    write_csv(os.path.join(workdir, "results.csv"), run_rows(records, result.extra))
    total = sum(r.seconds or 0.0 for r in records)
    ran = [r for r in records if not r.skipped]
    overview = runs_table(records, config.metric) + (
        f"\n\n{len(ran)} of {len(records)} runs trained by this invocation "
        f"({total:.0f} s of training recorded over all runs)."
    )
    sections = [("Runs", overview), *result.sections]
    write_markdown(
        os.path.join(workdir, "results.md"),
        config.title,
        f"{config.description}\n\nHeadline metric: {metric.label}.",
        sections,
        result.images,
    )
    return {"records": records, "images": result.images, "sections": result.sections}


def run_ablation(config: Any, workdir: str, train: Any = None, log: Any = print) -> dict[str, Any]:
    if config.kind not in ANALYSES:
        raise LoraError(f"ablation kind {config.kind!r}; expected one of {sorted(ANALYSES)}")
    os.makedirs(workdir, exist_ok=True)
    records = run_sweep(config.run, list(config.sweep), workdir, train=train, log=log)
    return report(config, records, workdir)
