"""One side of the MiniLM LoRA comparison alone in a fresh process: no other runtime's threads.

    python -m benchmarks.solo --side ours|peft --size '{"minilm_batch": 32, ...}' [--model DIR]
                              [--jaxlib-defaults]   # ours without the project's compile options

Prints one `RESULT {json}` line (median and min step seconds). `benchmarks.suite` runs it once
per side beside the in-process alternation, since two runtimes' thread pools in one process can
slow each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

from benchmarks.common import alternate


def run_side(side: str, size: dict, model_dir: str, jaxlib_defaults: bool = False) -> dict:
    from benchmarks import steps, torch_peft

    b, q, c = size["minilm_batch"], size["query_len"], size["code_len"]
    model = steps.minilm(b, q, c, path=model_dir)
    if jaxlib_defaults:
        model = dataclasses.replace(model, compiler_options={})
    if side == "ours":
        run = steps.build(model, "lora", steps.lora_spec(steps.BERT_QV, 16, 32.0), side).run
    else:
        run, _ = torch_peft.make_step(model_dir, model.batch, "lora", threads=size["threads"])
    return alternate({side: run}, size["steps"], warmup=2)[side]


def in_subprocess(side: str, size: dict, model_dir: str, timeout: float = 900,
                  env: dict | None = None, jaxlib_defaults: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.solo", "--side", side, "--size", json.dumps(size),
           "--model", model_dir, *(["--jaxlib-defaults"] if jaxlib_defaults else [])]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}: {p.stderr.strip()[-800:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["ours", "peft"], required=True)
    ap.add_argument("--size", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--jaxlib-defaults", action="store_true")
    args = ap.parse_args()
    result = run_side(args.side, json.loads(args.size), args.model, args.jaxlib_defaults)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
