"""What every analysis gets and returns, and small helpers they share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from lora_jax.ablate.sweep import RunRecord


@dataclasses.dataclass
class Analysis:
    """Markdown sections, PNG base names, and per-run extra CSV columns ({run name: {col: value}})."""

    sections: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    images: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Metric:
    """The headline metric (an eval key) and which direction is better."""

    key: str
    higher_is_better: bool

    def of(self, r: RunRecord) -> float:
        v = r.eval.get(self.key)
        return float(v) if isinstance(v, (int, float)) else math.nan

    def beats(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    @property
    def label(self) -> str:
        return f"{self.key} ({'higher' if self.higher_is_better else 'lower'} is better)"


def with_tag(records: Sequence[RunRecord], **tags: Any) -> list[RunRecord]:
    return [r for r in records if all(r.tags.get(k) == v for k, v in tags.items())]


def ordered(values: Sequence[Any]) -> list[Any]:
    """Distinct values in first-seen order."""
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def final_loss(r: RunRecord, window: int = 3) -> float:
    """Mean of the last `window` logged training losses (a single batch loss is noisy)."""
    _, ys = r.series("loss")
    ys = ys[-window:]
    return sum(ys) / len(ys) if ys else math.nan


def smoothed(ys: Sequence[float], window: int = 3) -> list[float]:
    """Trailing mean, so a threshold crossing is not one lucky batch."""
    return [
        sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1])
        for i in range(len(ys))
    ]


def steps_to_reach(r: RunRecord, target: float) -> float:
    """First logged step at which the smoothed training loss is <= target (nan if never)."""
    steps, ys = r.series("loss")
    for s, y in zip(steps, smoothed(ys)):
        if y <= target:
            return float(s)
    return math.nan


def series_by(by: dict, groups: Sequence[Any], xs: Sequence[Any], value: Any,
              label: Any = lambda g: g) -> dict:
    """{label(g): (xs present for g, value(run) at each)} from runs keyed by (group, x): one line
    per group in a line plot."""
    return {label(g): ([x for x in xs if (g, x) in by], [value(by[(g, x)]) for x in xs if (g, x) in by])
            for g in groups}
