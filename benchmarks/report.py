"""results.md, the scaling plot and the target table from the results dict of benchmarks.run."""

from __future__ import annotations

import os
from typing import Any

SECTIONS = ("## Machine and versions", "## 1. LoRA vs full fine-tuning", "## 2. Against PEFT (PyTorch)",
            "## 3. Against the machine and a hand-written Flax step", "## 4. How cost grows",
            "## 5. Adapter on disk; merged vs unmerged inference", "## Targets")


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def targets(res: dict) -> list[dict]:
    """Each target of the issue with the measured value and whether it is met."""
    out = []

    def add(name, value, limit, ok):
        met = None if value is None else ok(value)
        out.append({"target": name, "value": value, "limit": limit,
                    "met": None if met is None else bool(met)})

    pairs = {"minilm": res["minilm"]["lora_vs_full"], **res["llama"]}
    for name, p in pairs.items():
        add(f"{name}: LoRA/full XLA FLOPs", p["ratios"]["xla_flops"], "<= 0.70", lambda v: v <= 0.70)
        add(f"{name}: LoRA/full step time", p["ratios"]["step_time"], "<= 0.70", lambda v: v <= 0.70)
        add(f"{name}: optimizer bytes / adapter bytes", p["lora_optimizer_over_adapter_bytes"],
            "= 2 (±1%)", lambda v: abs(v - 2) <= 0.02)
    for name, p in res["llama"].items():  # the bound is for configs where weights dominate
        heavy = p["lora"]["base_bytes"] >= p["lora"]["temp_bytes"]
        add(f"{name}: LoRA/full compiled memory ({'weight' if heavy else 'activation'}-dominated)",
            p["ratios"]["compiled_bytes"], "<= 0.40" if heavy else "n/a (activations > weights)",
            (lambda v: v <= 0.40) if heavy else (lambda v: None))
    add("MiniLM LoRA step, fp32, equal math: lora_jax / PEFT (same run)",
        res["minilm"].get("vs_peft", {}).get("lora"), "<= 1.00", lambda v: v <= 1.00)
    add("the same, each side alone in its own process",
        res["minilm"].get("alone", {}).get("ours_over_peft"), "<= 1.00", lambda v: v <= 1.00)
    add("MiniLM LoRA step: achieved FLOP/s / dense matmul", res["machine_ceiling"]["fraction"],
        ">= 0.65", lambda v: v >= 0.65)
    add("MiniLM LoRA step: lora_jax / hand-written", res["minilm"]["vs_handwritten"], "<= 1.05",
        lambda v: v <= 1.05)
    io = res["adapter_io"]
    add("saved adapter bytes (limit 1.05 x adapter + 100 KB)", io["disk_bytes"],
        f"<= {int(1.05 * io['adapter_bytes'] + 100_000)}",
        lambda v: v <= 1.05 * io["adapter_bytes"] + 100_000)
    add("merged / base inference time", io["inference"]["merged_over_base"], "= 1 (±5%)",
        lambda v: abs(v - 1) <= 0.05)
    return out


def plot(scaling: dict, width_rows: list[dict], path: str) -> str | None:
    """Log-log step time and FLOPs vs rank, sequence length and width (one PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = [("rank", scaling["rank"]), ("seq", scaling["seq"]), ("width", width_rows)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (kind, rows) in zip(axes, series):
        xs = [r[kind] for r in rows]
        ax.loglog(xs, [r["median_s"] for r in rows], "o-", label="step time (s)")
        ax2 = ax.twinx()
        ax2.set_yscale("log")
        ax2.plot(xs, [r["analytic_flops"] / 1e9 for r in rows], "s--", color="C1",
                 label="analytic GFLOP")
        ax2.plot(xs, [r["xla_flops"] / 1e9 for r in rows], "x:", color="C2", label="XLA GFLOP")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(kind)
        ax.set_ylabel("step time (s)")
        ax2.set_ylabel("GFLOP")
        ax.set_title(f"LoRA step vs {kind}")
        if kind == "rank":
            ax2.legend(loc="upper left", fontsize=7)
            ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def markdown(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    L: list[str] = [f"# lora_jax benchmarks ({'smoke' if res['settings']['smoke'] else 'full'} run)", ""]
    L += [SECTIONS[0], "", f"- date {m['date']}, host {m['hostname']}, {m['cpu']}, {m['cpu_count']} CPUs",
          f"- load average at start {m['load_avg']}, at end {res.get('load_avg_end')}",
          f"- {m['platform']}; JAX backend {m['jax_backend']}",
          "- " + ", ".join(f"{k} {x}" for k, x in v.items()),
          f"- wall time of the suite: {_f(res.get('elapsed_s'))} s",
          f"- XLA options the project compiles MiniLM's steps with (ours and the hand-written one; "
          f"lora_jax/models/compile_options.py): "
          f"{res['minilm']['config'].get('compiler_options') or 'none'}", ""]
    L += [SECTIONS[1], "", "Medians over alternating steps after warm-up; memory = argument + temp bytes "
          "of the compiled step.", "",
          "| model | method | step s | XLA GFLOP | analytic GFLOP | compiled | optimizer state | trainable |",
          "|---|---|---|---|---|---|---|---|"]
    pairs = {"minilm": res["minilm"]["lora_vs_full"], **res["llama"]}
    for name, p in pairs.items():
        for meth in ("lora", "full"):
            x = p[meth]
            L.append(f"| {name} | {meth} | {_f(x['median_s'])} | {_f(x['xla_flops'] / 1e9)} | "
                     f"{_f(x['analytic_flops'] / 1e9)} | {_mb(x['compiled_bytes'])} | "
                     f"{_mb(x['optimizer_bytes'])} | {_mb(x['trainable_bytes'])} |")
    L += ["", "| model | FLOPs ratio | compiled-memory ratio | optimizer ratio | step-time ratio | "
          "opt/adapter bytes |", "|---|---|---|---|---|---|"]
    for name, p in pairs.items():
        r = p["ratios"]
        L.append(f"| {name} | {_f(r['xla_flops'])} | {_f(r['compiled_bytes'])} | "
                 f"{_f(r['optimizer_bytes'])} | {_f(r['step_time'])} | "
                 f"{_f(p['lora_optimizer_over_adapter_bytes'])} |")
    mn = res["minilm"]
    L += ["", SECTIONS[2], ""]
    if "vs_peft" in mn:
        L += ["Equal math: PEFT's forward without dropout (lora_jax's BERT has none); the `+dropout` "
              "row is PEFT's usual training mode, shown for reference, not compared.", "",
              "| method | lora_jax s | PEFT s | lora_jax / PEFT |", "|---|---|---|---|"]
        for meth, r in mn["vs_peft"].items():
            ours = mn["lora_vs_full"][meth.split("+")[0]]["median_s"]
            L.append(f"| {meth} | {_f(ours)} | {_f(mn['peft'][meth]['median_s'])} | {_f(r)} |")
        alone = mn.get("alone", {})
        if alone:
            L.append("| lora, each side alone in its own process | "
                     + " | ".join(_f(alone[k].get("median_s")) if "median_s" in alone[k]
                                  else alone[k].get("error", "")[:60] for k in ("ours", "peft"))
                     + f" | {_f(alone.get('ours_over_peft'))} |")
        L.append(f"\nPEFT attention: {mn['peft']['lora'].get('attn_implementation')}, "
                 f"torch threads {mn['peft']['lora'].get('torch_threads')}.")
    else:
        L.append(f"Skipped: {mn['peft'].get('skipped')}")
    c = res["machine_ceiling"]
    L += ["", SECTIONS[3], "",
          f"- dense fp32 matmul {c['matmul']['n']}³: {_f(c['matmul']['flops_per_s'] / 1e9)} GFLOP/s "
          f"(median of runs before and after the timed groups)",
          f"- lora_jax MiniLM LoRA step: {_f(c['step_flops_per_s'] / 1e9)} GFLOP/s (analytic FLOPs / "
          f"median time) = {_f(c['fraction'])} of the matmul rate",
          f"- hand-written Flax LoRA step: {_f(mn['handwritten']['median_s'])} s, "
          f"{_f(mn['handwritten']['xla_flops'] / 1e9)} XLA GFLOP; lora_jax / hand-written time = "
          f"{_f(mn['vs_handwritten'])}"]
    if "bf16_probe" in mn:
        pb = mn["bf16_probe"]
        peft = mn.get("peft", {}).get("lora", {}).get("median_s")
        L.append(f"- probe, not a target: the hand-written step with its frozen matmuls in bf16 (fp32 "
                 f"accumulation, the AMX path of XLA:CPU): {_f(pb['median_s'])} s = "
                 f"{_f(pb['over_handwritten_fp32'])} x the fp32 hand-written step"
                 + (f", {_f(pb['median_s'] / peft)} x PEFT" if peft else ""))
    L.append("")
    s = res["scaling"]
    L += [SECTIONS[4], "", f"Config: {s['config']}. Log-log slopes (time, analytic FLOPs): "
          + ", ".join(f"{k}: {_f(a)}, {_f(b)}" for k, (a, b) in s["slopes"].items()), ""]
    if s.get("plot"):
        L += [f"![scaling]({s['plot']})", ""]
    L += ["| sweep | x | step s | XLA GFLOP | analytic GFLOP | adapter params |", "|---|---|---|---|---|---|"]
    for kind in ("rank", "seq", "width"):
        for r in s[kind]:
            L.append(f"| {kind} | {r[kind]} | {_f(r['median_s'])} | {_f(r['xla_flops'] / 1e9)} | "
                     f"{_f(r['analytic_flops'] / 1e9)} | {r.get('adapter_params', '')} |")
    io = res["adapter_io"]
    inf = io["inference"]
    L += ["", SECTIONS[5], "",
          f"- adapter arrays {io['adapter_bytes']:,} B; saved directory {io['disk_bytes']:,} B "
          f"(ratio {_f(io['disk_over_bytes'])}, overhead {io['disk_overhead_bytes']:,} B)",
          f"- forward on {inf['batch']} tokens: base {_f(inf['base']['median_s'])} s, merged "
          f"{_f(inf['merged']['median_s'])} s, unmerged {_f(inf['unmerged']['median_s'])} s; "
          f"merged/base {_f(inf['merged_over_base'])}, unmerged/base {_f(inf['unmerged_over_base'])}; "
          f"max |merged - unmerged| {_f(inf['max_abs_diff_merged_vs_unmerged'])}", ""]
    L += [SECTIONS[6], "", "| target | value | limit | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        L.append(f"| {t['target']} | {_f(t['value'])} | {t['limit']} | {met} |")
    if any(t["met"] is False and "PEFT" in t["target"] for t in res["targets"]):
        L += ["", "Not met against PEFT: where the step's time goes, op by op beside PyTorch's, is "
              "`python -m benchmarks.breakdown` (benchmarks/results/breakdown.md); the XLA:CPU "
              "settings tried, each in its own process, `python -m benchmarks.xla_flags` "
              "(benchmarks/results/xla_flags.md); what was changed and measured is in WORKSPACE.md, "
              "\"The CPU step at equal math\"."]
    return "\n".join(L) + "\n"
