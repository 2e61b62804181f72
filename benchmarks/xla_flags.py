"""Our MiniLM LoRA step under XLA:CPU flag settings, each in a fresh process (flags are read once).

    python -m benchmarks.xla_flags --out benchmarks/results            # batch 32, query 64 / code 128
    python -m benchmarks.xla_flags --out /tmp/x --small                # tiny shapes, structure only

"jaxlib default" is XLA_FLAGS as the user left it, without the options the project compiles
BERT with (lora_jax/models/compile_options.py); the flag rows are single flags on top of it;
"project default" is the step as the main job compiles it. Settings alternate over `--rounds`,
so machine drift hits each alike.
"""

from __future__ import annotations

import argparse
import os
import statistics

from benchmarks import solo
from benchmarks.common import MINILM, machine, versions, write_results

PROJECT = "project default (compile options)"
SETTINGS = {
    "jaxlib default": None,
    PROJECT: None,
    "no YNNPACK fusions": "--xla_cpu_experimental_ynn_fusion_type=",
    "XNNPACK dot fusions": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
    "no XNNPACK": "--xla_cpu_use_xnnpack=false",
}


MEASURED = tuple(f.split("=")[0] for f in SETTINGS.values() if f)


def _env(flags: str | None) -> dict:
    """The child's environment: the inherited XLA_FLAGS without any flag measured here, plus `flags`."""
    env = dict(os.environ)
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(MEASURED)]
    env["XLA_FLAGS"] = " ".join([*inherited, *([flags] if flags else [])])
    return env


def measure(size: dict, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, flags in SETTINGS.items():
            runs[name].append(solo.in_subprocess("ours", size, MINILM, env=_env(flags),
                                                 jaxlib_defaults=name != PROJECT))
    out = {}
    for name, rs in runs.items():
        medians = [r["median_s"] for r in rs if "median_s" in r]
        errors = [r["error"] for r in rs if "error" in r]
        out[name] = {"flags": SETTINGS[name], "median_s": statistics.median(medians) if medians else None,
                     "process_medians_s": medians, **({"errors": errors} if errors else {})}
    return out


def report(res: dict) -> str:
    base = res["settings"]["jaxlib default"]["median_s"]
    lines = [f"MiniLM LoRA step (r=16 q,v, AdamW, fp32), {res['size']}; median of per-process medians "
             f"over {res['rounds']} rounds.\n", "| setting | flags | step s | vs jaxlib default |",
             "|---|---|---|---|"]
    for name, r in res["settings"].items():
        s = r["median_s"]
        ratio = f"{s / base:.3f}" if s and base else ""
        flags = "(none)" if r["flags"] is None else r["flags"]
        flags = "per compile: ynn fusions off" if name == PROJECT else flags
        lines.append(f"| {name} | `{flags}` | "
                     f"{s:.3f} | {ratio} |" if s else f"| {name} | | error | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    size = {"minilm_batch": 32, "query_len": 64, "code_len": 128, "steps": 5, "threads": 2}
    if args.small:
        size.update(minilm_batch=2, query_len=8, code_len=8, steps=1)
    res = {"size": size, "rounds": 1 if args.small else args.rounds, "machine": machine(),
           "versions": versions()}
    res["settings"] = measure(size, res["rounds"])
    write_results(args.out, "xla_flags", res, report(res))


if __name__ == "__main__":
    main()
