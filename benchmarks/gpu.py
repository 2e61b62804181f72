"""One prepared accelerator run: lora_jax's configurations against PyTorch + PEFT's, side by side,
at TinyLlama-1.1B's shape (batch 8 x 2,048) and Llama-3-8B's (the largest batch both fit).

    python -m benchmarks.gpu --dry                     # the matrix and its time budget; runs nothing
    python -m benchmarks.gpu --out DIR                 # on one GPU (H200): <= 7.5 min by default
    python -m benchmarks.gpu --out DIR --small         # every code path in tiny shapes, on CPU

Each side runs in its own worker process (benchmarks/gpu_worker.py), one configuration at a
time under a time limit, and the whole run under --budget-s; the JSON and markdown in DIR are
rewritten after every configuration, so a run cut short still leaves its numbers. Which
configuration comes next depends on what the earlier ones found (the attention kernel the device
takes, the 8B batch that fits, the fastest remat policy), in the order of `matrix` below.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from benchmarks import gpu_report
from benchmarks.gpu_plan import DEVICE_PLAN, SMALL_PLAN, Plan, estimate, model_flops, step_estimate
from benchmarks.gpu_worker import Worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"
# --small: XLA:CPU compiles tiny shapes ~3x faster so (its times mean nothing anyway)
SMALL_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
ABLATION_FLAGS = "--xla_gpu_enable_triton_gemm=false"


class Session:
    """Hands items to workers within the budget and records every result (or why there is none)."""

    def __init__(self, plan: Plan, args: argparse.Namespace):
        self.plan, self.args, self.dry = plan, args, args.dry
        if plan.small:
            args.xla_flags = f"{args.xla_flags} {SMALL_FLAGS}".strip()
        self.t0, self.clock = time.perf_counter(), 0.0
        self.workers: dict[str, Worker] = {}
        self.loaded: dict[str, tuple] = {}  # worker name -> (model, layout) its last item built
        self.active = ""  # the worker that holds the device
        self.platform = ""  # "cpu" once a result says so: then workers need not take turns
        self.attention = "auto"  # becomes what the device's first lora_jax item resolved it to
        self.res = {"meta": {"rank": plan.rank, "seq": plan.seq, "budget_s": plan.budget_s,
                             "small": plan.small, "xla_flags": args.xla_flags,
                             "flop_convention": gpu_report.FLOP_CONVENTION},
                    "models": {m: {"shape": plan.shape(m), "flops_per_sequence_of_seq_tokens":
                                   model_flops(plan.shape(m), 1, plan.seq, plan.rank)}
                               for m in ("1.1b", "8b")}, "runs": []}

    def elapsed(self) -> float:
        return self.clock if self.dry else time.perf_counter() - self.t0

    def env(self, name: str) -> dict:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if name.startswith("jax"):
            flags = [env.get("XLA_FLAGS", ""), self.args.xla_flags]
            if name == "jax-ablation":
                flags.append(self.args.ablation_flags)
            env["XLA_FLAGS"] = " ".join(f for f in flags if f)
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
        else:
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        return env

    def prestart(self, name: str) -> None:
        """Start a worker now (it imports, then waits) so its start overlaps the current side."""
        if not self.dry and (name not in self.workers or not self.workers[name].alive()):
            log = os.path.join(self.args.out, "gpu_workers.log")
            self.workers[name] = Worker("jax" if name.startswith("jax") else "torch", self.env(name), log)

    def ask(self, name: str, item: dict, prestart: str | None = None) -> dict:
        """Run one item on worker `name` (started if needed), unless the budget cannot hold it;
        `prestart` names a worker to start importing meanwhile."""
        key = (item["model"], item.get("scan"))
        worker = self.workers.get(name)
        first = self.active != name or (not self.dry and (not worker.alive() or worker.asked == 0))
        if self.active != name and self.platform != "cpu":  # an accelerator: one worker at a time
            for other, w in self.workers.items():
                if other != name and w.asked and w.alive():
                    w.close()
            self.loaded = {}
        est = estimate(self.plan, item, first, self.loaded.get(name) != key) * self.pace()
        left = self.plan.budget_s - self.elapsed()
        record = {"id": len(self.res["runs"]), "estimate_s": round(est, 1), "pace": self.pace(), **item}
        record.pop("shape", None)
        if est > left:
            return self.record({**record, "skipped": f"budget: ~{est:.0f} s needed, {left:.0f} s left"})
        if self.dry:
            self.clock += est
            self.loaded[name], self.active = key, name
            return self.record({**record, **self.fake(item)})
        self.active = name
        self.prestart(name)
        if prestart:
            self.prestart(prestart)
        t = time.perf_counter()
        limit = min(self.args.item_limit_s or 2 * est + 60, left)
        result = self.workers[name].ask(item, limit)
        if name.startswith("jax") and _unknown_flag(result) and self.args.xla_flags:
            self.res["meta"]["xla_flags_refused"] = f"{self.args.xla_flags}: {result['error']}"
            self.args.xla_flags = ""  # this XLA does not know a flag: once more without ours
            for other, w in self.workers.items():
                if other.startswith("jax"):
                    w.kill()  # prestarted ones too: they read XLA_FLAGS at their first item
            self.prestart(name)
            result = self.workers[name].ask(item, limit)
        self.loaded[name] = key if "error" not in result else None
        self.platform = result.get("platform", self.platform)
        return self.record({**record, **result, "wall_s": time.perf_counter() - t})

    def pace(self) -> float:
        """How the finished items' wall times compare with their estimates (0.5-2), so the
        budget check of the next item uses this device's speed, not only the table's."""
        done = [r for r in self.res["runs"] if "wall_s" in r and "error" not in r]
        if not done:
            return 1.0
        ratio = sum(r["wall_s"] for r in done) / sum(r["estimate_s"] / r["pace"] for r in done)
        return min(2.0, max(0.5, ratio))

    def fake(self, item: dict) -> dict:
        """--dry: the result an item would give if everything fit at its first candidate."""
        att = "cudnn" if item.get("attn") == "auto" else item.get("attn")
        return {"batch": item["batches"][0], "attention": att,
                "median_s": step_estimate(item["model"], item["batches"][0])}

    def record(self, r: dict) -> dict:
        self.res["runs"].append(r)
        self.res["elapsed_s"] = self.elapsed()
        self.res["meta"]["peak_flops_per_s"] = gpu_report.peak_flops(self.res["runs"], self.args.peak_tflops)
        devs = [x for x in self.res["runs"] if "device" in x]
        if devs:
            self.res["meta"]["device"] = devs[0]["device"]
            vers = {k: x[k] for x in devs for k in ("jax", "torch", "transformers", "peft") if k in x}
            self.res["meta"]["versions"] = ", ".join(f"{k} {v}" for k, v in sorted(vers.items()))
        peak = self.res["meta"]["peak_flops_per_s"]
        self.res["best"] = gpu_report.derive(self.plan, self.res["runs"], peak)
        if not self.dry:
            gpu_report.write(self.args.out, self.res)
        return r

    def close(self) -> None:
        for w in self.workers.values():
            w.close()


def _unknown_flag(result: dict) -> bool:
    return result.get("error", "").startswith("worker exited") and "nknown flag" in result["error"]


def jax_item(s: Session, model: str, policy: str, batches: list[int], scan: bool = True,
             attn: str | None = None) -> dict:
    p = s.plan
    warm, timed = p.steps[model]
    item = {"side": "jax", "model": model, "policy": policy, "scan": scan, "attn": attn or s.attention,
            "batches": list(batches), "shape": p.shape(model), "seq": p.seq, "rank": p.rank,
            "warmup": warm, "steps": timed}
    item["attention"] = item["attn"]
    if p.simulate_jax_max_batch and len(item["batches"]) > 1:
        item["simulate_max_batch"] = p.simulate_jax_max_batch
    return item


def torch_item(s: Session, model: str, gc: bool, batches: list[int], max_batch: int | None = None) -> dict:
    p = s.plan
    warm, timed = p.steps[model]
    item = {"side": "torch", "model": model, "gc": gc, "batches": list(batches), "shape": p.shape(model),
            "seq": p.seq, "rank": p.rank, "warmup": warm, "steps": timed}
    if max_batch is not None:
        item["simulate_max_batch"] = max_batch
    return item


def _jax(s: Session, name: str, item: dict, prestart: str | None = None) -> dict:
    """A lora_jax item; the first learns the attention kernel, and a failing cuDNN falls back to
    XLA for the rest of the run (the failure stays in the results)."""
    r = s.ask(name, item, prestart)
    if "median_s" in r and s.attention == "auto":
        s.attention = r["attention"]
    failed = "error" in r and not r["error"].startswith(("does not fit", "timed out"))
    if failed and item["attn"] in ("auto", "cudnn") and not s.dry:
        s.attention = "xla"
        return s.ask(name, {**item, "attn": "xla", "attention": "xla"})
    return r


def _fastest(s: Session, model: str, **match) -> dict | None:
    runs = [r for r in s.res["runs"] if r["side"] == "jax" and r["model"] == model and "median_s" in r
            and all(r.get(k) == v for k, v in match.items())]
    return min(runs, key=lambda r: r["median_s"], default=None)


def matrix(s: Session) -> None:
    """The run, most telling items first (so a short budget drops the least)."""
    p, small = s.plan, s.plan.small
    ablation = None if small else "jax-ablation"
    s.prestart("jax")
    _jax(s, "jax", jax_item(s, "1.1b", "none", [p.batch_1b], attn="auto"), prestart="torch")
    _jax(s, "jax", jax_item(s, "1.1b", "save_dots", [p.batch_1b]))
    b_jax = _jax(s, "jax", jax_item(s, "8b", "full", p.batches_8b)).get("batch")
    # the next jax workers import while PEFT measures; they touch the device after torch exits
    s.ask("torch", torch_item(s, "1.1b", True, [p.batch_1b]), prestart="jax")
    if ablation:
        s.prestart(ablation)
    s.ask("torch", torch_item(s, "1.1b", False, [p.batch_1b]))
    cands = [b for b in p.batches_8b if b_jax is None or b <= b_jax]
    r8 = s.ask("torch", torch_item(s, "8b", True, cands, p.simulate_torch_max_batch))
    b_both = r8.get("batch") or b_jax
    if b_both:
        s.ask("torch", torch_item(s, "8b", False, [b_both], 0 if small else None))
    if b_both and b_jax and b_both < b_jax:  # PEFT fits less: lora_jax again at PEFT's batch
        _jax(s, "jax", jax_item(s, "8b", "full", [b_both]))
    if b_both and not small:
        r = _jax(s, "jax", jax_item(s, "8b", "save_dots", [b_both]))
        if r.get("error", "").startswith("does not fit"):  # keep less: attention's projections
            _jax(s, "jax", jax_item(s, "8b", "save_dots_except_mlp", [b_both]))
    best = _fastest(s, "1.1b", scan=True, attention=s.attention)
    policy = best["policy"] if best else "full"
    _jax(s, "jax", jax_item(s, "1.1b", policy, [p.batch_1b], scan=False))
    if s.attention != "xla":
        _jax(s, "jax", jax_item(s, "1.1b", policy, [p.batch_1b], attn="xla"))
    if not small:
        _jax(s, "jax", jax_item(s, "1.1b", "full", [p.batch_1b]))
    best = _fastest(s, "1.1b")
    if best and ablation:  # one XLA flag as a measured ablation, in a worker of its own
        item = jax_item(s, "1.1b", best["policy"], [p.batch_1b], best["scan"], best["attention"])
        s.ask(ablation, {**item, "xla_flags": s.args.ablation_flags})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU run of every code path)")
    ap.add_argument("--dry", action="store_true", help="print the matrix and time budget; run nothing")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run limit (default 450; 300 small)")
    ap.add_argument("--item-limit-s", type=float, default=None,
                    help="per-item limit (default 2 x estimate + 60)")
    ap.add_argument("--batches-8b", default=None, help="8B candidate batches, largest first (16,8,4,2,1)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak; default by device")
    ap.add_argument("--xla-flags", default=JAX_FLAGS, help="XLA_FLAGS added for lora_jax's workers")
    ap.add_argument("--ablation-flags", default=ABLATION_FLAGS, help="added for the one ablation item")
    args = ap.parse_args()
    plan = SMALL_PLAN if args.small else DEVICE_PLAN
    if args.budget_s is not None:
        if args.budget_s <= 0:
            sys.exit(f"error: --budget-s must be positive, got {args.budget_s}")
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    if args.batches_8b:
        try:
            batches = tuple(int(b) for b in args.batches_8b.split(","))
        except ValueError:
            batches = ()
        if not batches or min(batches) < 1 or list(batches) != sorted(set(batches), reverse=True):
            sys.exit(f"error: --batches-8b wants distinct positive integers, largest first "
                     f"(e.g. 16,8,4), got {args.batches_8b!r}")
        plan = dataclasses.replace(plan, batches_8b=batches)
    if not args.dry:
        os.makedirs(args.out, exist_ok=True)
    s = Session(plan, args)
    try:
        matrix(s)
    finally:
        s.close()
    if args.dry:
        print(dry_table(s))
        return
    print(gpu_report.markdown(s.res))


def dry_table(s: Session) -> str:
    lines = [f"{'#':>2} {'side':5} {'model':5} {'configuration':58} {'batches':14} {'est s':>6} {'at s':>6}"]
    at = 0.0
    for r in s.res["runs"]:
        at += 0 if "skipped" in r else r["estimate_s"]
        cfg = gpu_report.label({**r, "attention": r.get("attention", r.get("attn"))})
        state = r.get("skipped", f"{at:6.0f}")
        lines.append(f"{r['id']:>2} {r['side']:5} {r['model']:5} {cfg:58} {str(r['batches']):14} "
                     f"{r['estimate_s']:>6} {state:>6}")
    lines.append(f"total ~{at:.0f} s of the {s.plan.budget_s:.0f} s budget (each item may take up to "
                 f"2 x its estimate + 60 s, the whole run at most the budget); device session: "
                 f"+ ~2-3 min machine start + transfers")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
