"""results.csv (one row per run) and results.md (markdown sections) for a sweep.

The CSV is the machine-readable record (tags, the overrides, parameter counts, every final eval
metric, run time); the markdown holds the tables a reader wants, each section supplied by the
experiment's analysis, plus the paper's numbers in tables of their own.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

from lora_jax.ablate.sweep import RunRecord


def _union(keys_per_row: Sequence[Sequence[str]]) -> list[str]:
    out: list[str] = []
    for keys in keys_per_row:
        out.extend(k for k in keys if k not in out)
    return out


def run_rows(records: Sequence[RunRecord], extra: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """Flat rows: name, tag columns, override columns, counts, eval metrics, analysis extras."""
    extra = extra or {}
    tag_keys = _union([list(r.tags) for r in records])
    set_keys = _union([list(r.overrides) for r in records])
    eval_keys = _union([list(r.eval) for r in records])
    extra_keys = _union([list(extra.get(r.name, {})) for r in records])
    rows = []
    for r in records:
        _, losses = r.series("loss")
        row = {"name": r.name}
        row.update({f"tag:{k}": r.tags.get(k, "") for k in tag_keys})
        row.update({f"set:{k}": r.overrides.get(k, "") for k in set_keys})
        row["method"] = r.config.method
        row["trainable_params"] = r.info.get("trainable_params", "")
        row["steps"] = r.info.get("steps", "")
        row["final_loss"] = losses[-1] if losses else ""
        row.update({k: r.eval.get(k, "") for k in eval_keys})
        row.update({k: extra.get(r.name, {}).get(k, "") for k in extra_keys})
        row["run_seconds"] = "" if r.seconds is None else round(r.seconds, 1)
        rows.append(row)
    return rows


def write_csv(path: str, rows: Sequence[dict]) -> None:
    header = _union([list(r) for r in rows])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(r.get(k, ""), digits=8) for k in header})


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers compactly (4 significant digits by default), everything else as str."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def params_str(n: Any) -> str:
    if not isinstance(n, (int, float)) or n == "":
        return str(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through `fmt`, "|" is escaped."""
    cell = lambda v: fmt(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(records: Sequence[RunRecord], metric: str) -> str:
    """The overview every experiment gets: one line per run."""
    tag_keys = _union([list(r.tags) for r in records])
    header = ["run", *tag_keys, "trainable params", metric, "final train loss", "seconds"]
    rows = []
    for r in records:
        _, losses = r.series("loss")
        rows.append(
            [
                r.name,
                *(r.tags.get(k, "") for k in tag_keys),
                params_str(r.info.get("trainable_params", "")),
                r.eval.get(metric, ""),
                losses[-1] if losses else "",
                "" if r.seconds is None else round(r.seconds, 1),
            ]
        )
    return md_table(header, rows)


def write_markdown(
    path: str, title: str, description: str, sections: Sequence[tuple[str, str]], images: Sequence[str]
) -> None:
    parts = [f"# {title}", description.strip()]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}")
    if images:
        parts.append("## Plots\n\n" + "\n".join(f"![{os.path.splitext(p)[0]}]({p})" for p in images))
    with open(path, "w") as f:
        f.write("\n\n".join(parts) + "\n")
