"""LoRA variants side by side (LoRA, rsLoRA, LoRA+, DoRA, PiSSA, OLoRA, full FT) over ranks and seeds.

Each claim of a variant's paper is judged on the seeds' means: the difference to plain LoRA at the
same rank against twice its standard error (√(s₁²/n₁ + s₂²/n₂)); within that band it is "not
resolved", never a win.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from lora_jax.ablate import paper, plots
from lora_jax.ablate.common import Analysis, Metric, final_loss, ordered, steps_to_reach
from lora_jax.ablate.report import fmt, md_table
from lora_jax.ablate.sweep import RunRecord

# The claim each variant's paper makes about it against LoRA at the same rank.
CLAIMS = {
    "rslora": "better at the larger rank (α/√r keeps the update's size as r grows)",
    "loraplus": "faster convergence and a better final metric (η_B = 16·η_A)",
    "dora": "+1–4 points over LoRA at equal rank",
    "pissa": "faster convergence and a higher final metric",
    "olora": "faster convergence",
}


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan, len(vals)


def _pm(values: Sequence[float]) -> str:
    mean, sd, n = _mean_sd(values)
    of = f"{n} of {len(values)}" if n < len(values) else f"n={n}"
    return f"{fmt(mean)} ± {fmt(sd)} ({of})" if n else f"never (0 of {len(values)})"


def compare(a: Sequence[float], b: Sequence[float], higher_is_better: bool) -> tuple[float, str]:
    """(mean(a) − mean(b), verdict) with the 2-standard-error rule of the module docstring."""
    (ma, sa, na), (mb, sb, nb) = _mean_sd(a), _mean_sd(b)
    if na < 2 or nb < 2:
        return ma - mb, "not resolved (fewer than 2 seeds)"
    diff, se = ma - mb, math.sqrt(sa**2 / na + sb**2 / nb)
    better = diff > 0 if higher_is_better else diff < 0
    if abs(diff) <= 2 * se:
        return diff, f"not resolved (|Δ| ≤ 2·SE = {fmt(2 * se)})"
    return diff, "supported" if better else "contradicted"


def _speed(runs: Sequence[RunRecord], target: float) -> list[float]:
    """Steps each run needs to reach `target` training loss (nan where it never does)."""
    return [steps_to_reach(r, target) for r in runs]


def _mean_curve(runs: Sequence[RunRecord]) -> tuple[list[int], list[float]]:
    """The seeds' mean training loss at the steps every run logged."""
    series = [dict(zip(*r.series("loss"), strict=True)) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return steps, [statistics.fmean(s[k] for s in series) for k in steps]


def variants(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    names = ordered([r.tags["variant"] for r in records])
    ranks = sorted(ordered([r.tags["rank"] for r in records if r.tags["rank"] != "full"]))
    group = {(v, k): [r for r in records if r.tags["variant"] == v and r.tags["rank"] == k]
             for v in names for k in [*ranks, "full"]}
    group = {key: runs for key, runs in group.items() if runs}
    src = opts.get("source_key", "")

    def forgetting(r: RunRecord) -> float:
        return r.eval.get(src, math.nan) - r.first_eval().get(src, math.nan)

    header = ["variant", "rank", m.key, "final train loss", *([f"Δ {src} (forgetting)"] if src else [])]
    rows = []
    for (v, k), runs in group.items():
        row = [v, k, _pm([m.of(r) for r in runs]), _pm([final_loss(r) for r in runs])]
        rows.append(row + ([_pm([forgetting(r) for r in runs])] if src else []))
        for r in runs:
            extra = {"forgetting": forgetting(r)} if src else {}
            out.extra[r.name] = {"final_loss": final_loss(r), **extra}
    out.sections.append((f"{m.key} and final loss, mean ± sd over seeds", md_table(header, rows)))

    verdicts = []
    for v, claim in CLAIMS.items():
        for k in ranks if v != "rslora" else ranks[-1:]:
            if (v, k) not in group or ("lora", k) not in group:
                continue
            ours, base = group[(v, k)], group[("lora", k)]
            diff, verdict = compare([m.of(r) for r in ours], [m.of(r) for r in base], m.higher_is_better)
            target = statistics.fmean(final_loss(r) for r in base)
            s_ours, s_base = _speed(ours, target), _speed(base, target)
            _, faster = compare(s_ours, s_base, higher_is_better=False)
            verdicts.append([v, k, claim, fmt(diff), verdict, f"{_pm(s_ours)} vs {_pm(s_base)}", faster])
    out.sections.append(("Claims against LoRA at the same rank", md_table(
        ["variant", "rank", "paper's claim", f"Δ {m.key} vs LoRA", "final-metric verdict",
         "steps to LoRA's final loss (variant vs LoRA)", "speed verdict"], verdicts)
        + "\n\nSpeed: the first logged step whose 3-point smoothed loss reaches the mean final loss "
        "of LoRA at that rank (nan: never)."))

    full = [m.of(r) for k, runs in group.items() if k[1] == "full" for r in runs]
    series = {v: ([k for k in ranks if (v, k) in group],
                  [_mean_sd([m.of(r) for r in group[(v, k)]])[0] for k in ranks if (v, k) in group])
              for v in names if v != "full"}
    hlines = {"full fine-tuning": _mean_sd(full)[0]} if full else None
    out.images.append(plots.line_plot(os.path.join(workdir, "variants_metric.png"), series, "rank",
                                      m.key, f"{m.key} by variant and rank (mean over seeds)", logx=True,
                                      hlines=hlines))
    curves = [(f"r={k}", {v: _mean_curve(group[(v, k)]) for v in names if (v, k) in group}) for k in ranks]
    if ("full", "full") in group:
        curves.append(("full fine-tuning", {"full": _mean_curve(group[("full", "full")])}))
    out.images.append(plots.panels(os.path.join(workdir, "variants_curves.png"), curves, "step",
                                   "train loss", "mean learning curves per variant", logy=True))
    out.sections.append(("Paper", paper.VARIANTS))
    return out
