"""Run metrics: `metrics.jsonl` (one object per row, with `step`), TensorBoard events, a progress bar.

Only process 0 writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        self._drop_rows_after(start_step)
        self._jsonl = open(self.path, "a")  # noqa: SIM115 (kept open for the whole run)
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _drop_rows_after(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint we resume from (they get redone);
        a run that starts from scratch starts a fresh file."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if step > 0 and line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def progress(self, step: int, loss: float, rate: float) -> None:
        if self.enabled:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:.1f}", refresh=True)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(text)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v if isinstance(v, (str, list, dict, bool)) or v is None else str(v)
    if isinstance(v, (bool, int)) and not isinstance(v, float):
        return v
    return f if math.isfinite(f) else str(f)
