"""The benchmark suite: LoRA vs full, vs PEFT, vs the machine and a hand-written step, scaling,
adapter size and merged inference -- one command, one results.json + results.md.

    python -m benchmarks.run --out runs/bench          # full run, sized for <= 15 min on 2 cores
    python -m benchmarks.run --out /tmp/b --smoke      # tiny shapes, 2 steps: structure only

Sizes are chosen so the full run fits 15 minutes on 2 CPU cores; scale-out figures come from
`python -m benchmarks.plan` and accelerator figures from `python -m benchmarks.gpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

FULL = dict(minilm_batch=32, query_len=64, code_len=128, steps=10, threads=2,
            widths=(256, 512, 1024), llama_layers=4, llama_batch=4, llama_seq=128, vocab=8192,
            sweep_width=512, ranks=(1, 4, 16, 64, 256), seqs=(64, 128, 256, 512), sweep_steps=5,
            inference_reps=10, matmul_n=2048, bf16_probe=True)
SMOKE = dict(minilm_batch=4, query_len=16, code_len=32, steps=2, threads=2,
             widths=(32, 64), llama_layers=1, llama_batch=2, llama_seq=32, vocab=512,
             sweep_width=32, ranks=(1, 4), seqs=(16, 32), sweep_steps=2, inference_reps=2,
             matmul_n=256, bf16_probe=False)


def tiny_bert_dir(directory: str) -> str:
    """A 2-layer random BERT saved as an HF directory: the smoke run's stand-in for MiniLM."""
    from lora_jax.models import from_config, save_pretrained

    hf = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 2000,
          "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2,
          "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
    m = from_config(hf, seed=0)
    save_pretrained(m, m.params, directory)
    return directory


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def run(out_dir: str, smoke: bool = False, model_dir: str | None = None) -> dict:
    """Measure everything and write out_dir/results.json and out_dir/results.md."""
    from benchmarks import report, suite
    from benchmarks.common import machine, matmul_rate, versions

    t0 = time.perf_counter()
    size = dict(SMOKE if smoke else FULL)
    os.makedirs(out_dir, exist_ok=True)
    res: dict[str, Any] = {"machine": machine(), "versions": versions(),
                           "settings": {"smoke": smoke, **size}}
    if smoke and model_dir is None:
        model_dir = tiny_bert_dir(tempfile.mkdtemp(prefix="tiny_bert_"))
    suite._log("dense matmul rate (before)")
    mm_before = matmul_rate(size["matmul_n"])
    res["minilm"] = suite.minilm_group(size, model_dir)
    res["llama"] = suite.llama_groups(size)
    suite._log("dense matmul rate (after)")
    mm_after = matmul_rate(size["matmul_n"])
    times = mm_before["times_s"] + mm_after["times_s"]
    mm = {**mm_before, "median_s": statistics.median(times), "min_s": min(times), "times_s": times}
    mm["flops_per_s"] = mm["flops"] / mm["median_s"]
    lora = res["minilm"]["lora_vs_full"]["lora"]
    step_rate = lora["analytic_flops"] / lora["median_s"]
    res["machine_ceiling"] = {"matmul": mm, "step_flops_per_s": step_rate,
                              "step_xla_flops_per_s": lora["xla_flops"] / lora["median_s"],
                              "fraction": step_rate / mm["flops_per_s"],
                              "matmul_before_s": mm_before["median_s"],
                              "matmul_after_s": mm_after["median_s"]}
    suite._log("scaling sweeps")
    sc = suite.scaling(size)
    sc["width"] = [{"width": p["config"]["hidden_size"], "median_s": p["lora"]["median_s"],
                    "xla_flops": p["lora"]["xla_flops"], "analytic_flops": p["lora"]["analytic_flops"],
                    "adapter_params": p["lora"]["adapter_params"],
                    "compiled_bytes": p["lora"]["compiled_bytes"]} for p in res["llama"].values()]
    sc["slopes"] = {k: (suite.slope([r[k] for r in sc[k]], [r["median_s"] for r in sc[k]]),
                        suite.slope([r[k] for r in sc[k]], [r["analytic_flops"] for r in sc[k]]))
                    for k in ("rank", "seq", "width")}
    sc["plot"] = report.plot(sc, sc["width"], os.path.join(out_dir, "scaling.png"))
    res["scaling"] = sc
    suite._log("adapter on disk; merged vs unmerged inference")
    res["adapter_io"] = suite.adapter_and_inference(res["minilm"]["_model"], res["minilm"]["_adapters"],
                                                    out_dir, size["inference_reps"])
    res["targets"] = report.targets(res)
    res["elapsed_s"] = time.perf_counter() - t0
    res["load_avg_end"] = list(os.getloadavg())
    clean = _jsonable(res)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(clean, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(report.markdown(clean))
    suite._log(f"wrote {out_dir}/results.json and results.md in {res['elapsed_s']:.0f} s")
    return clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.json / results.md")
    parser.add_argument("--smoke", "--quick", action="store_true", dest="smoke",
                        help="tiny shapes and 2 steps (CI): checks the pipeline, not the numbers")
    parser.add_argument("--model", default=None, help="BERT-family HF dir instead of MiniLM")
    args = parser.parse_args()
    res = run(args.out, args.smoke, args.model)
    for t in res["targets"]:
        print(f"{'ok ' if t['met'] else 'MISS' if t['met'] is False else ' - '} {t['target']}: "
              f"{t['value']} (target {t['limit']})")


if __name__ == "__main__":
    main()
