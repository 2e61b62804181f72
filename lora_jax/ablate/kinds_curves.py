"""Analyses of learning curves: α/r vs α/√r scaling (rsLoRA) and the LoRA+ ratio × A init sweep."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from lora_jax.ablate import paper, plots
from lora_jax.ablate.common import (
    Analysis,
    Metric,
    final_loss,
    ordered,
    series_by,
    steps_to_reach,
    with_tag,
)
from lora_jax.ablate.report import md_table
from lora_jax.ablate.sweep import RunRecord


def _spread(values: Sequence[float]) -> float:
    """(max - min) / |mean|: how tightly a set of final losses bunches together."""
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 2:
        return math.nan
    return (max(vals) - min(vals)) / max(abs(statistics.fmean(vals)), 1e-12)


def scaling(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    grid = with_tag(records, group="rank")
    modes = ordered([r.tags["scaling"] for r in grid])
    ranks = sorted(ordered([r.tags["rank"] for r in grid]))
    by = {(r.tags["scaling"], r.tags["rank"]): r for r in grid}
    header = ["rank", *(f"final loss {s}" for s in modes), *(f"{m.key} {s}" for s in modes)]
    rows = [
        [
            k,
            *(final_loss(by[(s, k)]) if (s, k) in by else "" for s in modes),
            *(m.of(by[(s, k)]) if (s, k) in by else "" for s in modes),
        ]
        for k in ranks
    ]
    large = [k for k in ranks if k >= opts.get("large_rank", 16)]
    claims = []
    for s in modes:
        losses = [final_loss(by[(s, k)]) for k in large if (s, k) in by]
        ordered_ok = all(b < a for a, b in zip(losses, losses[1:]))
        claims.append([s, ", ".join(map(str, large)), _spread(losses), "yes" if ordered_ok else "no"])
    text = (
        md_table(header, rows)
        + "\n\nDo curves for large ranks bunch together? Spread = (max − min) / mean of "
        "the final training loss over the large ranks; the claim is a small spread under standard (α/r) "
        "and a steady decrease with rank under rslora (α/√r).\n\n"
        + md_table(
            ["scaling", "large ranks", "spread of final loss", "loss falls with every rank step"], claims
        )
    )
    out.sections.append(
        (f"Final loss and {m.key} by rank (α = {grid[0].config.lora.alpha if grid else ''})", text)
    )
    curves = [(s, {f"r={k}": by[(s, k)].series("loss") for k in ranks if (s, k) in by}) for s in modes]
    out.images.append(
        plots.panels(
            os.path.join(workdir, "scaling_curves.png"),
            curves,
            "step",
            "train loss",
            "learning curves per rank",
            logy=True,
        )
    )
    norms = [
        (f"{s}: {key}", {f"r={k}": by[(s, k)].series(key) for k in ranks if (s, k) in by})
        for s in modes
        for key in ("grad_norm_a", "grad_norm_b")
    ]
    out.images.append(
        plots.panels(
            os.path.join(workdir, "grad_norms.png"),
            norms,
            "step",
            "gradient norm",
            "gradient norms of A and B",
            logy=True,
        )
    )
    sweep = with_tag(records, group="alpha")
    if sweep:
        rows = [
            [r.tags["alpha"], r.tags["rank"], r.tags.get("scaling", ""), final_loss(r), m.of(r)]
            for r in sweep
        ]
        out.sections.append(
            ("α sweep at fixed rank", md_table(["α", "rank", "scaling", "final loss", m.key], rows))
        )
        out.images.append(
            plots.panels(
                os.path.join(workdir, "alpha_curves.png"),
                [("α sweep", {f"α={r.tags['alpha']}": r.series("loss") for r in sweep})],
                "step",
                "train loss",
                "learning curves per α",
                logy=True,
            )
        )
    out.sections.append(("Paper", paper.SCALING))
    return out


def loraplus_init(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    inits = ordered([r.tags["init"] for r in records])
    ratios = sorted(ordered([r.tags["ratio"] for r in records]))
    by = {(r.tags["init"], r.tags["ratio"]): r for r in records}
    for r in records:  # speed: steps to reach the loss the ratio-1 run of the same init ends at
        base = by.get((r.tags["init"], ratios[0]))
        target = final_loss(base) if base else math.nan
        steps = steps_to_reach(r, target)
        base_steps = steps_to_reach(base, target) if base else math.nan
        out.extra[r.name] = {
            "final_loss": final_loss(r),
            "steps_to_baseline_loss": steps,
            "speedup_vs_ratio1": base_steps / steps if steps and math.isfinite(steps) else math.nan,
        }
    header = ["η_B/η_A", *(f"{m.key} {i}" for i in inits), *(f"speed-up {i}" for i in inits)]
    rows = [
        [
            k,
            *(m.of(by[(i, k)]) if (i, k) in by else "" for i in inits),
            *(out.extra[by[(i, k)].name]["speedup_vs_ratio1"] if (i, k) in by else "" for i in inits),
        ]
        for k in ratios
    ]
    out.sections.append(
        (
            "LoRA+ ratio × A init",
            md_table(header, rows)
            + (
                f"\n\nSpeed-up = steps the ratio-{ratios[0]} run of the same init needs to reach its final "
                "(3-point smoothed) training loss, divided by the steps this run needs (nan: never reached)."
            ),
        )
    )
    series = series_by(by, inits, ratios, m.of)
    out.images.append(
        plots.line_plot(
            os.path.join(workdir, "loraplus.png"),
            series,
            "η_B / η_A",
            m.key,
            f"{m.key} vs LoRA+ ratio per A init",
            logx=True,
        )
    )
    curves = [(i, {f"ratio {k}": by[(i, k)].series("loss") for k in ratios if (i, k) in by}) for i in inits]
    out.images.append(
        plots.panels(
            os.path.join(workdir, "loraplus_curves.png"),
            curves,
            "step",
            "train loss",
            "learning curves per ratio",
            logy=True,
        )
    )
    out.sections.append(("Paper", paper.LORAPLUS_INIT))
    return out
