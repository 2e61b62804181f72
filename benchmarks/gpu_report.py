"""`benchmarks.gpu`'s outputs: derived rates per run, the JSON and the markdown table."""

from __future__ import annotations

import json
import os

from benchmarks.gpu_plan import FLOP_CONVENTION, PEAK_BF16, Plan, model_flops


def peak_flops(runs: list[dict], override_tflops: float | None) -> float | None:
    """The chip's dense bf16 peak by device name; on CPU the measured bf16 matmul rate."""
    if override_tflops:
        return override_tflops * 1e12
    for r in runs:
        kind = r.get("device", "")
        peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
        if peak:
            return peak
    return next((r["matmul_bf16_flops_per_s"] for r in runs if r.get("matmul_bf16_flops_per_s")), None)


def label(r: dict) -> str:
    if r["side"] == "torch":
        return f"PEFT, SDPA, bf16, grad ckpt {'on' if r['gc'] else 'off'}"
    layout = "scan" if r["scan"] else "unrolled"
    flags = f", {r['xla_flags']}" if r.get("xla_flags") else ""
    return f"lora_jax, {layout}, remat={r['policy']}, attention={r.get('attention', r['attn'])}{flags}"


def derive(plan: Plan, runs: list[dict], peak: float | None) -> dict:
    """Fill tokens/s, MFU and the ratio to PEFT's best; return the fastest run per side/model."""
    for r in runs:
        if "median_s" in r:
            fl = model_flops(plan.shape(r["model"]), r["batch"], plan.seq, plan.rank)
            r["tokens_per_s"] = r["batch"] * plan.seq / r["median_s"]
            r["model_flops_per_s"] = fl["lora"] / r["median_s"]
            r["mfu"] = r["model_flops_per_s"] / peak if peak else None
            r["mfu_causal_halved"] = fl["lora_causal_halved"] / r["median_s"] / peak if peak else None
    best: dict = {}
    for model in ("1.1b", "8b"):
        timed = [r for r in runs if r["model"] == model and "median_s" in r]
        peft = min((r for r in timed if r["side"] == "torch"), key=lambda r: r["median_s"], default=None)
        at = [r for r in timed if r["side"] == "jax" and (peft is None or r["batch"] == peft["batch"])]
        jax_best = max(at, key=lambda r: r["tokens_per_s"], default=None)
        best[model] = {"peft": peft and peft["id"], "lora_jax": jax_best and jax_best["id"]}
        for r in timed:
            same = peft is not None and r["batch"] == peft["batch"]
            r["vs_peft_best"] = r["tokens_per_s"] / peft["tokens_per_s"] if same else None
    return best


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(res: dict) -> str:
    meta, runs = res["meta"], res["runs"]
    peak = meta.get("peak_flops_per_s")
    lines = [f"# benchmarks.gpu: LoRA r={meta['rank']} on every linear layer, bf16 base, seq {meta['seq']}",
             "", f"Device: {meta.get('device', '?')}; {meta.get('versions', '')}; "
             f"elapsed {res.get('elapsed_s', 0):.0f} s of a {meta['budget_s']:.0f} s budget.",
             f"lora_jax's XLA_FLAGS: `{meta.get('xla_flags') or '(none)'}`.", "",
             f"MFU: {FLOP_CONVENTION}; peak used {_cell(peak and peak / 1e12, '.4g')} TFLOP/s.",
             "Peak GiB: lora_jax = the compiled step's buffers (arguments + outputs + temporaries "
             "- aliased, XLA memory analysis); PEFT = torch.cuda.max_memory_allocated. "
             "Compile s: lora_jax lower+compile; PEFT (eager) its first step.", "",
             "| configuration | model | batch | step s | tok/s | MFU | peak GiB | compile s "
             "| tok/s vs PEFT best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        name, model = label(r), r["model"]
        if "median_s" not in r:
            why = r.get("skipped") or r.get("error", "?")
            batch = r.get("batch") or "/".join(str(b) for b in r["batches"])
            lines.append(f"| {name} | {model} | {batch} | {why[:160]} | | | | | |")
            continue
        mem = r.get("compiled_bytes") if r["side"] == "jax" else r.get("peak_bytes")
        comp = r.get("compile_s") if r["side"] == "jax" else r.get("first_step_s")
        lines.append(f"| {name} | {model} | {r['batch']} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{_cell(r['mfu'], '.3f')} | {_cell(mem and mem / 2**30, '.1f')} | "
                     f"{_cell(comp, '.0f')} | {_cell(r['vs_peft_best'], '.2f')} |")
    lines.append("")
    by_id = {r["id"]: r for r in runs}
    for model, b in res.get("best", {}).items():
        parts = [f"{label(by_id[i])} ({by_id[i]['tokens_per_s']:,.0f} tok/s at batch {by_id[i]['batch']})"
                 for i in (b["lora_jax"], b["peft"]) if i is not None]
        lines.append(f"- fastest at {model}: " + ("; ".join(parts) if parts else "nothing timed"))
    searches = [r for r in runs if len(r.get("tried", [])) > 1]
    for r in searches:
        steps = ", ".join(f"{t['batch']}: {'fits' if t['fits'] else 'no'}" for t in r["tried"])
        lines.append(f"- batch search, {label(r)} at {r['model']}: {steps}")
    return "\n".join(lines) + "\n"


def write(out_dir: str, res: dict) -> None:
    """Rewrite both files whole (after every run, so a cut-off run still leaves its numbers)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("gpu_results.json", json.dumps(res, indent=1)), ("gpu_results.md", markdown(res))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
