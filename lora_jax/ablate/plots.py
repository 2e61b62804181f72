"""PNG plots for the sweeps (matplotlib, Agg backend: no display needed).

Each function writes one file and returns its base name, so analyses can list what they drew.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return os.path.basename(path)


def _draw_lines(ax, series: Series, logx: bool, logy: bool, marker: str = "o") -> None:
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker=marker, markersize=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy and all(y > 0 for _, ys in series.values() for y in ys):
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def line_plot(
    path: str,
    series: Series,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    hlines: dict[str, float] | None = None,
    vlines: dict[str, float] | None = None,
) -> str:
    """Lines of y vs x per label; hlines/vlines are labelled reference lines (e.g. full FT, k)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_lines(ax, series, logx, logy)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", color=f"C{(len(series) + i) % 10}", label=label)
    for i, (label, x) in enumerate((vlines or {}).items()):
        ax.axvline(x, linestyle=":", color=f"C{(len(series) + i + 3) % 10}", label=label)
    if hlines or vlines:
        ax.legend(fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path)


def panels(
    path: str,
    named: Sequence[tuple[str, Series]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    share_y: bool = True,
) -> str:
    """Side-by-side line panels with one shared y scale, so the panels compare at a glance."""
    n = max(len(named), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), sharey=share_y, squeeze=False)
    for ax, (sub, series) in zip(axes[0], named):
        _draw_lines(ax, series, logx, logy, marker="")
        ax.set(xlabel=xlabel, title=sub)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    return _save(fig, path)


def heatmaps(
    path: str,
    grid: Sequence[Sequence[tuple[str, np.ndarray]]],
    title: str,
    xlabel: str = "j",
    ylabel: str = "i",
) -> str:
    """A rows x cols grid of [0, 1] heatmaps (φ(i, j) with i, j 1-based) with one colour bar."""
    rows = max(len(grid), 1)
    cols = max((len(r) for r in grid), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1, 2.2 * rows + 0.6), squeeze=False)
    image = None
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(grid[i]):
                ax.axis("off")
                continue
            sub, m = grid[i][j]
            m = np.asarray(m)
            image = ax.imshow(
                m,
                vmin=0.0,
                vmax=1.0,
                cmap="viridis",
                aspect="auto",
                origin="upper",
                extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5),
            )
            ax.set_title(sub, fontsize=7)
            ax.tick_params(labelsize=6)
            if i == rows - 1:
                ax.set_xlabel(xlabel, fontsize=7)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="φ")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return os.path.basename(path)


def scatter(
    path: str, points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str, title: str
) -> str:
    """Labelled points, one colour per label (e.g. each run on a learning/forgetting plane)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (label, x, y) in enumerate(points):
        if math.isfinite(x) and math.isfinite(y):
            ax.scatter([x], [y], color=f"C{i % 10}", label=label)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=7)
    return _save(fig, path)


def bars(
    path: str,
    labels: Sequence[str],
    groups: dict[str, Sequence[float]],
    ylabel: str,
    title: str,
    logy: bool = False,
) -> str:
    """Grouped bars: one group per label, one bar per key of `groups`."""
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels) * max(len(groups), 1)), 4))
    x = np.arange(len(labels))
    width = 0.8 / max(len(groups), 1)
    for i, (name, values) in enumerate(groups.items()):
        ax.bar(x + i * width, list(values), width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, list(labels), rotation=45, ha="right", fontsize=7)
    if logy:
        ax.set_yscale("log")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)
