"""Analyses of learned adapters: subspace similarity (Hu et al. §7.2) and amplification (Table 7).

They read adapters (lora_jax.adapter_io) and full fine-tuned trees (<run>/finetuned) back from the
run directories and the base weights from the task itself, so they work on finished sweeps alone.
"""

from __future__ import annotations

import csv
import os
import re
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_jax import analysis
from lora_jax.ablate import paper, plots
from lora_jax.ablate.common import Analysis, Metric, ordered
from lora_jax.ablate.report import md_table
from lora_jax.ablate.sweep import RunRecord
from lora_jax.adapter_io import load_adapter
from lora_jax.adapters import adapter_items
from lora_jax.paths import flat_paths

_LAYER = re.compile(r"(?:^|/)layers?_(\d+)(?=/|$)")


def split_path(path: str) -> tuple[int | None, str]:
    """(layer index or None, weight kind): "params/encoder/layer_3/attention/self/query/kernel" ->
    (3, "attention/self/query"); the kind names a weight type shared across layers."""
    m = _LAYER.search(path)
    layer = int(m.group(1)) if m else None
    kind = _LAYER.sub("", path) if m else path
    for prefix in ("params/", "encoder/", "model/"):
        kind = kind[len(prefix) :] if kind.startswith(prefix) else kind
    kind = re.sub(r"/?kernel$", "", kind.strip("/"))
    return layer, kind or "kernel"


def per_layer(path: str, mats: Sequence[Any]) -> list[tuple[int, str, Any]]:
    layer, kind = split_path(path)
    if len(mats) == 1:
        return [(0 if layer is None else layer, kind, mats[0])]
    return [(s, kind, m) for s, m in enumerate(mats)]  # a stacked (scanned) weight: one per layer


def base_weights(config: Any, run_dir: str) -> dict[str, np.ndarray]:
    """{path: host array} of the task's base params (the model the runs started from)."""
    from lora_jax import sharding as shd
    from lora_jax.trainer import build_task

    task = build_task(config, shd.make_mesh(config.mesh), run_dir)
    return {p: np.asarray(shd.to_host(w)) for p, w in flat_paths(task.params)}


def write_table_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def subspace(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    runs = {r.name: r for r in records}
    at = [i for i in (1, 2, 4, 8) if i <= opts.get("max_index", 8)]
    rows, summary = [], []
    rng = np.random.default_rng(opts.get("control_seed", 0))
    for first, second, label in opts.pairs:
        a1 = dict(adapter_items(load_adapter(os.path.join(runs[first].workdir, "adapter"))[0]))
        a2 = dict(adapter_items(load_adapter(os.path.join(runs[second].workdir, "adapter"))[0]))
        grids: dict[str, list[tuple[str, np.ndarray]]] = {}
        for path in [p for p in a1 if p in a2]:
            pairs1 = per_layer(path, [a for a, _ in analysis.as_matrices(a1[path])])
            pairs2 = per_layer(path, [a for a, _ in analysis.as_matrices(a2[path])])
            for (layer, kind, x), (_, _, y) in zip(pairs1, pairs2):
                g = analysis.subspace_similarity_grid(x, y)
                grids.setdefault(kind, []).append((f"{kind} L{layer}", g))
                rows.append([label, kind, layer, *(g[i - 1, i - 1] if i <= min(g.shape) else "" for i in at)])
        n_in, (r1, r2) = x.shape[0], (x.shape[1], y.shape[1])
        ctrl = analysis.subspace_similarity_grid(
            rng.standard_normal((n_in, r1)), rng.standard_normal((n_in, r2))
        )
        rows.append(
            [
                f"{label}: random Gaussian control",
                "random",
                "",
                *(ctrl[i - 1, i - 1] if i <= min(ctrl.shape) else "" for i in at),
            ]
        )
        grid_rows = [grids[k] for k in grids] + [[("random Gaussian control", ctrl)]]
        name = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        out.images.append(
            plots.heatmaps(
                os.path.join(workdir, f"subspace_{name}.png"),
                grid_rows,
                f"φ(A_{first}, A_{second}, i, j) per layer; last row: random control",
                xlabel=f"j ({second})",
                ylabel=f"i ({first})",
            )
        )
        for kind, gs in grids.items():
            summary.append(
                [
                    label,
                    kind,
                    *(
                        statistics.fmean(g[i - 1, i - 1] for _, g in gs) if i <= min(gs[0][1].shape) else ""
                        for i in at
                    ),
                ]
            )
        summary.append(
            [label, "random control", *(ctrl[i - 1, i - 1] if i <= min(ctrl.shape) else "" for i in at)]
        )
    header = ["pair", "weight", "layer", *(f"φ({i},{i})" for i in at)]
    write_table_csv(os.path.join(workdir, "subspace.csv"), header, rows)
    out.sections.append(
        (
            "Subspace similarity, mean over layers",
            md_table(["pair", "weight", *(f"φ({i},{i})" for i in at)], summary),
        )
    )
    out.sections.append(("Subspace similarity per layer", md_table(header, rows)))
    out.sections.append(("Paper", paper.SUBSPACE))
    return out


def amplification(opts: Any, m: Metric, records: Sequence[RunRecord], workdir: str) -> Analysis:
    out = Analysis()
    base = base_weights(records[0].config, records[0].workdir)
    rows = []
    for r in records:
        adapters, _ = load_adapter(os.path.join(r.workdir, "adapter"))
        for path, ad in adapter_items(adapters):
            deltas = analysis.weight_as_matrices(np.asarray(ad.delta()), ad)
            ws = analysis.weight_as_matrices(base[path], ad)
            for (layer, kind, d), w in zip(per_layer(path, deltas), ws):
                k = min(ad.rank, *d.shape)
                f = analysis.amplification_factor(d, w, k, seed=opts.get("seed", 0))
                rows.append(
                    [
                        r.name,
                        ad.rank,
                        kind,
                        layer,
                        f["delta_norm"],
                        float(np.linalg.norm(w)),
                        f["proj_delta"],
                        f["proj_w"],
                        f["proj_random"],
                        f["ratio_delta"],
                        f["ratio_random"],
                    ]
                )
    header = [
        "run",
        "rank",
        "weight",
        "layer",
        "‖ΔW‖_F",
        "‖W‖_F",
        "proj ΔW dirs",
        "proj W dirs",
        "proj random",
        "amplification (ΔW dirs)",
        "amplification (random)",
    ]
    write_table_csv(os.path.join(workdir, "amplification.csv"), header, rows)
    kinds = ordered([row[2] for row in rows])
    ranks = ordered([row[1] for row in rows])
    summary, mid_rows = [], []
    for k in ranks:
        for kind in kinds:
            sel = [row for row in rows if row[1] == k and row[2] == kind]
            if not sel:
                continue
            summary.append([k, kind, *(statistics.fmean(row[i] for row in sel) for i in range(4, 11))])
            mid_rows.append(sorted(sel, key=lambda row: row[3])[len(sel) // 2])
    out.sections.append(
        ("Amplification, mean over layers", md_table(["rank", "weight", *header[4:]], summary))
    )
    out.sections.append(("Middle layer (as the paper's layer 48 of 96)", md_table(header, mid_rows)))
    series = {}
    for kind in kinds:
        pts = [(row[0], row[7], row[8]) for row in summary if row[1] == kind]
        series[f"{kind}: ΔW dirs"] = ([p[0] for p in pts], [p[1] for p in pts])
        series[f"{kind}: random"] = ([p[0] for p in pts], [p[2] for p in pts])
    out.images.append(
        plots.line_plot(
            os.path.join(workdir, "amplification.png"),
            series,
            "rank r",
            "‖ΔW‖_F / ‖UᵀWVᵀ‖_F",
            "amplification factor (mean over layers)",
            logx=True,
            logy=True,
        )
    )
    out.sections.append(("Paper", paper.AMPLIFICATION))
    return out
