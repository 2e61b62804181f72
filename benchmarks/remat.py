"""Which activation-memory choice is fastest on this machine: remat policy x scanned/unrolled layers.

    python -m benchmarks.remat --out benchmarks/results      # MiniLM + a 4-layer Llama, ~6 min on 2 cores
    python -m benchmarks.remat --out /tmp/r --smoke          # tiny shapes, structure only

Each model's configurations run alternately in one process (lora_jax's real train step, LoRA r=16),
so their ratios share the machine's drift; the compiled step's temp bytes (XLA's memory analysis)
say what each choice saves. The GPU counterpart is part of `python -m benchmarks.gpu`.
"""

from __future__ import annotations

import argparse

from benchmarks import steps
from benchmarks.common import alternate, machine, versions, write_results
from lora_jax.models.remat import POLICIES

FULL = dict(minilm=dict(batch=32, query_len=64, code_len=128),
            llama=dict(width=512, layers=4, batch=4, seq=256), steps=6)
SMOKE = dict(minilm=dict(batch=4, query_len=16, code_len=32),
             llama=dict(width=64, layers=2, batch=2, seq=32, vocab=512), steps=1)


def _models(size: dict):
    """name -> (builder(**options), LoRA targets)."""
    return {"minilm": (lambda **o: steps.minilm(**size["minilm"], **o), steps.BERT_QV),
            "llama": (lambda **o: steps.llama(**size["llama"], **o), steps.LLAMA_ALL)}


def measure(size: dict) -> dict:
    out = {}
    for name, (make, targets) in _models(size).items():
        benches = {}
        for scan in (False, True):
            for policy in POLICIES:
                key = f"{policy}/{'scan' if scan else 'unrolled'}"
                model = make(scan_layers=scan, remat=policy)
                benches[key] = steps.build(model, "lora", steps.lora_spec(targets, 16), key)
        times = alternate({k: b.run for k, b in benches.items()}, size["steps"], warmup=1)
        rows = {k: {"median_s": times[k]["median_s"], "min_s": times[k]["min_s"],
                    "temp_bytes": b.info["temp_bytes"]} for k, b in benches.items()}
        out[name] = {"rows": rows, "fastest": min(rows, key=lambda k: rows[k]["median_s"])}
    return out


def markdown(res: dict) -> str:
    lines = []
    for name, r in res["models"].items():
        fastest = r["rows"][r["fastest"]]["median_s"]
        lines += [f"### {name}: fastest {r['fastest']}", "",
                  "| remat / layers | step s | vs fastest | temp MiB |", "|---|---|---|---|"]
        for k, row in r["rows"].items():
            lines.append(f"| {k} | {row['median_s']:.4f} | {row['median_s'] / fastest:.2f} | "
                         f"{row['temp_bytes'] / 2**20:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/remat")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    size = SMOKE if args.smoke else FULL
    res = {"size": size, "machine": machine(), "versions": versions(), "models": measure(size)}
    write_results(args.out, "remat", res, markdown(res))


if __name__ == "__main__":
    main()
