"""Analyses of final metrics against rank: rank × targets (Hu et al.) and the planted-rank knee."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from lora_jax.ablate import paper, plots
from lora_jax.ablate.common import Analysis, Metric, ordered, series_by, with_tag
from lora_jax.ablate.report import fmt, md_table, params_str
from lora_jax.ablate.sweep import RunRecord


def _cell(m: Metric, r: RunRecord | None) -> str:
    return "" if r is None else f"{fmt(m.of(r))} ({params_str(r.info.get('trainable_params', ''))})"


def rank_targets(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    grid = with_tag(records, mode="rank")
    targets = ordered([r.tags["targets"] for r in grid])
    ranks = sorted(ordered([r.tags["rank"] for r in grid]))
    by = {(r.tags["targets"], r.tags["rank"]): r for r in grid}
    rows = [[t, *(_cell(m, by.get((t, k))) for k in ranks)] for t in targets]
    full = with_tag(records, mode="full")
    for r in full:
        rows.append([f"full FT ({r.name})", _cell(m, r), *([""] * (len(ranks) - 1))])
    out.sections.append(
        (
            f"{m.key} by rank and target set (trainable params)",
            md_table(["targets", *(f"r={k}" for k in ranks)], rows),
        )
    )
    series = series_by(by, targets, ranks, m.of)
    out.images.append(
        plots.line_plot(
            os.path.join(workdir, "rank_targets.png"),
            series,
            "rank r",
            m.key,
            f"{m.key} vs rank per target set",
            logx=True,
            hlines={f"full FT {r.name}": m.of(r) for r in full},
        )
    )
    budget = with_tag(records, mode="budget")
    if budget:
        rows = [
            [r.tags["targets"], r.tags["rank"], r.info.get("trainable_params", ""), m.of(r)] for r in budget
        ]
        best = max(budget, key=lambda r: m.of(r) if m.higher_is_better else -m.of(r))
        out.sections.append(
            (
                "Fixed parameter budget",
                md_table(["targets", "rank", "trainable params", m.key], rows)
                + f"\n\nBest under the budget: **{best.tags['targets']} at r={best.tags['rank']}**.",
            )
        )
        out.images.append(
            plots.bars(
                os.path.join(workdir, "budget.png"),
                [f"{r.tags['targets']} r={r.tags['rank']}" for r in budget],
                {m.key: [m.of(r) for r in budget]},
                m.key,
                "fixed parameter budget",
            )
        )
    low = with_tag(records, mode="lowdata")
    if low:
        out.sections.append(("Low data", _low_data(opts, m, low, workdir, out)))
    out.sections.append(("Paper", paper.RANK_TARGETS))
    return out


def _low_data(opts: Any, m: Metric, low: Sequence[RunRecord], workdir: str, out: Analysis) -> str:
    seeds = ordered([r.tags.get("seed", 0) for r in low])
    ranks = sorted(ordered([r.tags["rank"] for r in low]))
    by = {(r.tags.get("seed", 0), r.tags["rank"]): r for r in low}
    rows = [[k, *(m.of(by[(s, k)]) if (s, k) in by else "" for s in seeds)] for k in ranks]
    n = low[0].tags.get("examples", "")
    text = md_table(["rank", *(f"seed {s}" for s in seeds)], rows)
    small, large = opts.get("small_rank", 16), opts.get("large_rank", 128)
    pairs = [(by[(s, small)], by[(s, large)]) for s in seeds if (s, small) in by and (s, large) in by]
    if pairs:
        wins = sum(m.beats(m.of(a), m.of(b)) for a, b in pairs)
        text += (
            f"\n\nOn {n} training examples, r={small} beats r={large} in **{wins} of {len(pairs)}** "
            f"seeds ({m.key})."
        )
    series = series_by(by, seeds, ranks, m.of, label=lambda s: f"seed {s}")
    out.images.append(
        plots.line_plot(
            os.path.join(workdir, "low_data.png"),
            series,
            "rank r",
            m.key,
            f"{m.key} vs rank on {n} training examples",
            logx=True,
        )
    )
    return text


def planted_rank(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    threshold = opts.get("knee_threshold", 0.01)
    ks = ordered([r.tags["k"] for r in records])
    ranks = sorted(ordered([r.tags["rank"] for r in records]))
    by = {(r.tags["k"], r.tags["rank"]): r for r in records}

    def rel(r: RunRecord) -> float:
        return r.eval.get("eval/mse", math.nan) / r.eval.get("eval/base_mse", math.nan)

    def overlap(r: RunRecord) -> float:
        vals = [v for k, v in r.eval.items() if k.startswith("eval/overlap/")]
        return statistics.fmean(vals) if vals else math.nan

    for r in records:
        out.extra[r.name] = {"mse_over_base": rel(r), "mean_overlap": overlap(r)}
    rows = [
        [
            k,
            *(
                x
                for kk in ks
                for x in ((rel(by[(kk, k)]), overlap(by[(kk, k)])) if (kk, k) in by else ("", ""))
            ),
        ]
        for k in ranks
    ]
    header = ["rank", *(x for kk in ks for x in (f"mse/base (k={kk})", f"overlap (k={kk})"))]
    knees = []
    for kk in ks:
        have = [k for k in ranks if (kk, k) in by]
        below = [k for k in have if rel(by[(kk, k)]) < threshold]
        drops = [(rel(by[(kk, a)]) / max(rel(by[(kk, b)]), 1e-30), b) for a, b in zip(have, have[1:])]
        drop, at = max(drops) if drops else (math.nan, None)
        first = min(below) if below else None
        knees.append([kk, at, drop, first, "yes" if at == kk else "no"])
    text = (
        md_table(header, rows)
        + "\n\nKnee = the rank after the largest drop in mse/base between neighbouring ranks; also the "
        + f"smallest rank with mse/base_mse < {threshold}:\n\n"
        + md_table(
            ["planted k", "knee (largest drop)", "drop factor", f"first rank < {threshold}", "knee == k"],
            knees,
        )
    )
    out.sections.append(("Error vs rank", text))
    series = series_by(by, ks, ranks, rel, label=lambda kk: f"k={kk}")
    out.images.append(
        plots.line_plot(
            os.path.join(workdir, "planted_rank.png"),
            series,
            "rank r",
            "held-out mse / base mse",
            "error vs rank (knee at the planted k)",
            logx=True,
            logy=True,
            vlines={f"planted k={kk}": kk for kk in ks},
        )
    )
    out.sections.append(("Paper", paper.PLANTED))
    return out
