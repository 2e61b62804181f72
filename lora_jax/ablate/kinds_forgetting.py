"""Learning vs forgetting (Biderman et al. 2024): target gain, source loss, and the rank of full FT's ΔW.

The full fine-tuned tree is read back from <run>/finetuned (lora_jax.adapter_io.load_tree, checksums
verified) and the base from the task, so this works on a finished sweep alone.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_jax import analysis
from lora_jax.ablate import paper, plots
from lora_jax.ablate.common import Analysis, Metric, ordered
from lora_jax.ablate.kinds_weights import base_weights, per_layer, write_table_csv
from lora_jax.ablate.report import md_table, params_str
from lora_jax.ablate.sweep import RunRecord
from lora_jax.adapter_io import load_tree
from lora_jax.paths import flat_paths


def _matrices(x: np.ndarray) -> list[np.ndarray]:
    """2-d as is; 3-d as [layer, in, out]; higher: all but the last axis flattened into "in"."""
    if x.ndim == 2:
        return [x]
    if x.ndim == 3:
        return list(x)
    return [x.reshape(-1, x.shape[-1])]


def spectrum_rows(run_dir: str, base: dict[str, np.ndarray], pattern: str, fraction: float) -> list[list]:
    tuned = load_tree(os.path.join(run_dir, "finetuned"))
    rows = []
    for path, w in flat_paths(tuned):
        w = np.asarray(w, np.float64)
        if w.ndim < 2 or not re.fullmatch(pattern, path):
            continue
        for layer, kind, d in per_layer(path, _matrices(w - base[path])):
            k = analysis.spectrum_rank(d, fraction)
            rows.append([kind, layer, "x".join(map(str, d.shape)), k, min(d.shape), k / min(d.shape)])
    return rows


def forgetting(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    tk, sk = opts.target_key, opts.source_key
    rows, points = [], []
    for r in records:
        b = r.first_eval()
        gain = b.get(tk, math.nan) - r.eval.get(tk, math.nan)
        forget = r.eval.get(sk, math.nan) - b.get(sk, math.nan)
        out.extra[r.name] = {"target_gain": gain, "source_loss_increase": forget}
        rows.append(
            [
                r.name,
                r.config.method,
                r.tags.get("rank", ""),
                params_str(r.info.get("trainable_params", "")),
                b.get(tk, ""),
                r.eval.get(tk, ""),
                gain,
                b.get(sk, ""),
                r.eval.get(sk, ""),
                forget,
            ]
        )
        points.append((r.name, r.eval.get(sk, math.nan), gain))
    out.sections.append(
        (
            "Learning vs forgetting",
            md_table(
                [
                    "run",
                    "method",
                    "rank",
                    "trainable",
                    f"{tk} base",
                    f"{tk} final",
                    "target gain",
                    f"{sk} base",
                    f"{sk} final",
                    "source loss increase",
                ],
                rows,
            ),
        )
    )
    out.images.append(
        plots.scatter(
            os.path.join(workdir, "forgetting.png"),
            points,
            f"final {sk} (forgetting →)",
            f"target gain: base − final {tk}",
            "learning vs forgetting",
        )
    )
    full = [r for r in records if r.config.method == "full"]
    lora_ranks = [r.config.lora.rank for r in records if r.config.method == "lora"]
    if full:
        base = base_weights(full[0].config, full[0].workdir)
        spec = spectrum_rows(full[0].workdir, base, opts.spectrum_targets, opts.fraction)
        write_table_csv(
            os.path.join(workdir, "spectrum.csv"),
            ["weight", "layer", "shape", "rank_for_fraction", "min_dim", "rank/min_dim"],
            spec,
        )
        kinds = ordered([row[0] for row in spec])
        med = {k: statistics.median(row[3] for row in spec if row[0] == k) for k in kinds}
        dims = {k: next(row[4] for row in spec if row[0] == k) for k in kinds}
        summary = [
            [k, med[k], dims[k], med[k] / dims[k], med[k] / max(lora_ranks) if lora_ranks else ""]
            for k in kinds
        ]
        out.sections.append(
            (
                f"Rank of the full-FT ΔW for {opts.fraction:.0%} of its spectrum ({full[0].name})",
                md_table(
                    [
                        "weight",
                        "median rank over layers",
                        "dimension",
                        "rank/dimension",
                        "× largest LoRA rank in the sweep",
                    ],
                    summary,
                ),
            )
        )
        out.images.append(
            plots.bars(
                os.path.join(workdir, "spectrum_rank.png"),
                kinds,
                {"rank for 90%": [med[k] for k in kinds], "dimension": [dims[k] for k in kinds]},
                "rank",
                "rank of full fine-tuning's ΔW",
            )
        )
    out.sections.append(("Paper", paper.FORGETTING))
    return out
