"""Where the MiniLM LoRA step's time goes: lora_jax per XLA op next to PyTorch + PEFT per aten op.

    python -m benchmarks.breakdown --out benchmarks/results          # batch 32, query 64 / code 128
    python -m benchmarks.breakdown --out /tmp/b --small              # tiny shapes, structure only

Ours: a `jax.profiler` trace of a few steps; each executed thunk (a fusion, a dot, a copy) is put
in a category by what its HLO computes (the op named in its metadata; dots with batch dimensions
are attention's, the others projections). PEFT: `torch.profiler`'s self CPU time per aten op, in
the same categories. Times are summed over the worker threads (busy time, not wall time) and
divided by the number of profiled steps.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

from benchmarks import steps, torch_peft
from benchmarks.common import MINILM, machine, versions, write_results

CATEGORIES = ("projection matmuls", "attention matmuls", "softmax", "layer norm", "gelu", "mask/select",
              "layout (copy, transpose)", "reductions", "optimizer", "elementwise/other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(")
_COMP = re.compile(r"^%([\w.\-]+) \(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def _kind(opcodes: set[str], op_names: list[str]) -> str:
    """A category for one executed thunk from the HLO opcodes it runs and their op_names."""
    if op_names and not any("jvp(" in n for n in op_names):
        return "optimizer"  # outside the forward (jvp) and backward (transpose(jvp)): clip + AdamW
    for op, cat in (("dot_batch", "attention matmuls"), ("dot", "projection matmuls"),
                    ("exponential", "softmax"), ("erf", "gelu"), ("tanh", "gelu"),
                    ("rsqrt", "layer norm"), ("select", "mask/select"), ("reduce", "reductions")):
        if op in opcodes:
            return cat
    if opcodes and opcodes <= {"copy", "transpose", "bitcast", "reshape", "broadcast", "parameter",
                               "concatenate", "slice", "pad", "dynamic-slice", "dynamic-update-slice"}:
        return "layout (copy, transpose)"
    return "elementwise/other"


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """{instruction name: category} for every instruction of an optimised HLO module; a fusion
    (or a call) is categorised by the instructions of the computation it calls."""
    comps: dict[str, tuple[set, list]] = {}
    instrs: list[tuple[str, str, str]] = []  # (name, computation, line)
    current = ""
    for line in hlo_text.splitlines():
        m = _COMP.match(line) or (line.startswith("ENTRY ") and re.match(r"ENTRY %([\w.\-]+)", line))
        if m:
            current = m.group(1)
            comps[current] = (set(), [])
            continue
        m = _INSTR.match(line)
        if not m or not current:
            continue
        op = m.group(2)
        if op == "dot" and "lhs_batch_dims=" in line:
            op = "dot_batch"
        comps[current][0].add(op)
        comps[current][1].extend(_OPNAME.findall(line))
        instrs.append((m.group(1), current, line))
    out = {}
    for name, _, line in instrs:
        ops, names = set(), _OPNAME.findall(line)
        called = _CALLS.findall(line)
        for c in called:
            ops |= comps.get(c, (set(), []))[0]
            names += comps.get(c, (set(), []))[1]
        if not called:
            ops.add(_INSTR.match(line).group(2))
            if "dot" in ops and "lhs_batch_dims=" in line:
                ops.add("dot_batch")
        out[name] = _kind(ops, names)
    return out


def ours(size: dict, model_dir: str, reps: int) -> dict:
    import jax
    from jax.profiler import ProfileData

    model = steps.minilm(size["batch"], size["query_len"], size["code_len"], path=model_dir)
    bench = steps.build(model, "lora", steps.lora_spec(steps.BERT_QV, 16, 32.0), "ours/lora")
    kinds = hlo_categories(bench.compiled.as_text())
    for _ in range(2):
        bench.run()
    trace_dir = tempfile.mkdtemp(prefix="lora_jax_trace_")
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for _ in range(reps):
        bench.run()
    wall = (time.perf_counter() - t0) / reps
    jax.profiler.stop_trace()
    data = ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    busy, by_thunk = collections.Counter(), collections.Counter()
    for name, seconds in thunk_spans(data, kinds).items():
        busy[kinds[name]] += seconds / reps
        by_thunk[name] += seconds / reps
    top = [{"thunk": k, "s": v, "category": kinds[k]} for k, v in by_thunk.most_common(15)]
    return _in_wall_time(busy, wall, top)


def thunk_spans(data, kinds: dict[str, str]) -> dict[str, float]:
    """Seconds per thunk, start to completion. An asynchronous thunk (XLA:CPU's Eigen dots, as
    compiled without YNNPACK fusions) has an event for its launch only and a zero-length
    "end: <name>" marker when it completes: its span runs to that marker."""
    starts: dict[str, list] = collections.defaultdict(list)
    ends: dict[str, list] = collections.defaultdict(list)
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                if e.name in kinds:
                    starts[e.name].append((e.start_ns, e.end_ns))
                elif e.name.startswith("end: ") and e.name[5:] in kinds:
                    ends[e.name[5:]].append(e.start_ns)
    out = {}
    for name, spans in starts.items():
        marks, total = sorted(ends.get(name, [])), 0
        for start, end in sorted(spans):
            later = [m for m in marks if m >= start]
            if later:  # completion recorded: the thunk ran until its marker
                marks.remove(later[0])
                end = max(end, later[0])
            total += end - start
        out[name] = total / 1e9
    return out


def _in_wall_time(busy: dict, wall: float, top: list) -> dict:
    """Busy seconds per category rescaled so that they add up to the step's wall time: the two
    profilers count parallel work differently (XLA per thread, torch per op on the calling
    thread), so each side is compared as its share of its own measured step."""
    total = sum(busy.values()) or 1.0
    return {"categories": {k: v * wall / total for k, v in busy.items()}, "busy_s": total,
            "wall_s": wall, "top": top}


_TORCH = [("projection matmuls", ("aten::addmm", "aten::mm", "aten::linear")),
          ("attention matmuls", ("aten::bmm", "aten::baddbmm", "_scaled_dot_product", "attention")),
          ("softmax", ("softmax",)), ("layer norm", ("layer_norm",)), ("gelu", ("gelu",)),
          ("mask/select", ("where", "masked_fill")),
          ("layout (copy, transpose)", ("copy_", "contiguous", "transpose", "clone", "cat", "permute")),
          ("reductions", ("sum", "mean", "norm")), ("optimizer", ("_foreach", "adam", "lerp", "addcdiv"))]


def _torch_category(name: str) -> str:
    for cat, keys in _TORCH:
        if any(k in name for k in keys):
            return cat
    return "elementwise/other"


def peft(size: dict, model_dir: str, reps: int) -> dict:
    import torch.profiler as tp

    model = steps.minilm(size["batch"], size["query_len"], size["code_len"], path=model_dir)
    step, info = torch_peft.make_step(model_dir, model.batch, "lora")
    for _ in range(2):
        step()
    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        wall = (time.perf_counter() - t0) / reps
    busy, by_op = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        s = ev.self_cpu_time_total / 1e6 / reps
        busy[_torch_category(ev.key)] += s
        by_op[ev.key] += s
    top = [{"op": k, "s": v, "category": _torch_category(k)} for k, v in by_op.most_common(15)]
    return {**_in_wall_time(busy, wall, top), **info}


def markdown(res: dict) -> str:
    o, p = res["ours"], res.get("peft", {})
    lines = [f"Per step, wall seconds by category: each profiler's busy time per category, scaled "
             f"to the step's measured wall time (config {res['size']}; profiled steps run slower "
             "than unprofiled ones).", "",
             "| category | lora_jax s | PEFT s | lora_jax − PEFT s |", "|---|---|---|---|"]
    for cat in CATEGORIES:
        a, b = o["categories"].get(cat, 0.0), p.get("categories", {}).get(cat, 0.0)
        lines.append(f"| {cat} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    lines.append(f"| **step (wall)** | {o['wall_s']:.4f} | {p.get('wall_s', 0.0):.4f} | "
                 f"{o['wall_s'] - p.get('wall_s', 0.0):+.4f} |")
    lines += ["", "Top lora_jax thunks (busy s): " + ", ".join(
        f"{t['thunk']} ({t['category']}) {t['s']:.4f}" for t in o["top"][:8])]
    if p:
        lines += ["", "Top PEFT ops (self s): " + ", ".join(f"{t['op']} {t['s']:.4f}" for t in p["top"][:8])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/breakdown")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--model", default=None, help="BERT-family HF dir (default: MiniLM)")
    args = ap.parse_args()
    size = (dict(batch=4, query_len=16, code_len=32) if args.small
            else dict(batch=32, query_len=64, code_len=128))
    from lora_jax.models.loading import resolve

    model_dir = str(resolve(args.model or MINILM))
    reps = 2 if args.small else 5
    res = {"size": size, "machine": machine(), "versions": versions(), "ours": ours(size, model_dir, reps)}
    if torch_peft.available() is None:
        res["peft"] = peft(size, model_dir, reps)
    write_results(args.out, "breakdown", res, markdown(res))


if __name__ == "__main__":
    main()
