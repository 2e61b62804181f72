"""The measurements of `python -m benchmarks.run`, one function per section of the report.

Every timed comparison is one `alternate` group, so its ratios are immune to slow drift of a
shared machine. Static costs (FLOPs, compiled bytes) come from the same executables that are
timed.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from benchmarks import handwritten, solo, steps, torch_peft
from benchmarks.common import alternate, block, ratio, summary
from lora_jax.adapter_io import save_adapter
from lora_jax.models import BertConfig
from lora_jax.models.loading import resolve


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pair(lora: steps.Bench, full: steps.Bench, times: dict) -> dict:
    """Side-by-side costs of one model's LoRA and full steps, with LoRA/full ratios."""
    li, fi = lora.info, full.info
    lt, ft = times[lora.name]["median_s"], times[full.name]["median_s"]
    return {
        "lora": {**li, **times[lora.name]}, "full": {**fi, **times[full.name]},
        "ratios": {
            "xla_flops": ratio(li["xla_flops"], fi["xla_flops"]),
            "analytic_flops": ratio(li["analytic_flops"], fi["analytic_flops"]),
            "compiled_bytes": ratio(li["compiled_bytes"], fi["compiled_bytes"]),
            "optimizer_bytes": ratio(li["optimizer_bytes"], fi["optimizer_bytes"]),
            "step_time": ratio(lt, ft),
        },
        "lora_optimizer_over_adapter_bytes": ratio(li["optimizer_bytes"], li["adapter_bytes"]),
    }


def minilm_group(size: dict, model_dir: str | None) -> dict:
    """Sections 1-3 for MiniLM: ours LoRA/full, hand-written LoRA, PEFT LoRA/full, alternating."""
    path = model_dir or steps.MINILM
    b, q, c = size["minilm_batch"], size["query_len"], size["code_len"]
    _log(f"MiniLM ({path}), batch {b}, query {q} / code {c} tokens: compiling")
    model = steps.minilm(b, q, c, path=path)
    spec = steps.lora_spec(steps.BERT_QV, 16, 32.0)
    lora = steps.build(model, "lora", spec, "ours/lora")
    full = steps.build(model, "full", name="ours/full")
    bert_config = BertConfig.from_hf(model.hf_config)
    hand = handwritten.build(model, bert_config, 16, 32.0)
    hand.name = "handwritten/lora"
    benches = [lora, full, hand]
    if size.get("bf16_probe"):
        probe = handwritten.build(model, bert_config, 16, 32.0, dot_dtype=jnp.bfloat16)
        probe.name = "handwritten/lora-bf16-dots"
        benches.append(probe)
    runners = {x.name: x.run for x in benches}
    peft_info: dict[str, Any] = {}
    why_not = torch_peft.available()
    if why_not is None:
        hf_dir = str(resolve(path))
        # equal math (dropout off, as lora_jax's BERT) for both methods; PEFT's usual training
        # mode (dropout on) as a labelled extra row
        for method, dropout in (("lora", False), ("full", False), ("lora", True)):
            name = method + ("+dropout" if dropout else "")
            run, info = torch_peft.make_step(hf_dir, model.batch, method, threads=size["threads"],
                                             dropout=dropout)
            runners[f"peft/{name}"] = run
            peft_info[name] = info
    else:
        _log(f"PEFT comparison skipped: {why_not}")
    _log(f"timing {len(runners)} MiniLM steps alternating, {size['steps']} rounds")
    times = alternate(runners, size["steps"], warmup=2)
    out: dict[str, Any] = {"config": {"batch": b, "query_len": q, "code_len": c, "rank": 16,
                                      "alpha": 32.0, "targets": "query,value", "path": path,
                                      "compiler_options": model.compiler_options},
                           "lora_vs_full": _pair(lora, full, times),
                           "handwritten": {**hand.info, **times[hand.name]}}
    out["vs_handwritten"] = ratio(times[lora.name]["median_s"], times[hand.name]["median_s"])
    if size.get("bf16_probe"):
        out["bf16_probe"] = {**probe.info, **times[probe.name],
                             "over_handwritten_fp32": ratio(times[probe.name]["median_s"],
                                                            times[hand.name]["median_s"])}
    if peft_info:
        out["peft"] = {m: {**peft_info[m], **times[f"peft/{m}"]} for m in peft_info}
        out["vs_peft"] = {m: ratio(times[f"ours/{m.split('+')[0]}"]["median_s"],
                                   times[f"peft/{m}"]["median_s"]) for m in peft_info}
        _log("each side's LoRA step alone in a process of its own")
        alone = {side: solo.in_subprocess(side, size, hf_dir) for side in ("ours", "peft")}
        out["alone"] = alone
        if "median_s" in alone["ours"] and "median_s" in alone["peft"]:
            out["alone"]["ours_over_peft"] = ratio(alone["ours"]["median_s"], alone["peft"]["median_s"])
    else:
        out["peft"] = {"skipped": why_not}
    out["_adapters"] = lora.state.trainable["adapters"]
    out["_model"] = model
    return out


def llama_groups(size: dict) -> dict:
    """Section 1 for random Llama-family decoders of several widths (q/v LoRA r=16)."""
    out = {}
    for width in size["widths"]:
        model = steps.llama(width, size["llama_batch"], size["llama_seq"], size["llama_layers"],
                            size["vocab"])
        _log(f"{model.name}: compiling LoRA and full")
        lora = steps.build(model, "lora", steps.lora_spec(steps.LLAMA_QV, 16, 32.0), "lora")
        full = steps.build(model, "full", name="full")
        times = alternate({"lora": lora.run, "full": full.run}, size["steps"], warmup=1)
        res = _pair(lora, full, times)
        res["config"] = {k: model.hf_config[k] for k in ("hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads", "vocab_size")}
        res["config"].update(batch=size["llama_batch"], seq=size["llama_seq"], rank=16,
                             targets="q_proj,v_proj")
        out[model.name] = res
        del lora, full
    return out


def scaling(size: dict) -> dict:
    """Section 4: LoRA step time and FLOPs vs rank and vs sequence length (all linear layers)."""
    w, L, B = size["sweep_width"], size["llama_layers"], size["llama_batch"]
    out: dict[str, list] = {"rank": [], "seq": []}
    base = steps.llama(w, B, size["llama_seq"], L, size["vocab"])
    benches = {}
    for r in size["ranks"]:
        benches[("rank", r)] = steps.build(base, "lora", steps.lora_spec(steps.LLAMA_ALL, r), f"r{r}")
    for t in size["seqs"]:
        m = steps.llama(w, B, t, L, size["vocab"])
        benches[("seq", t)] = steps.build(m, "lora", steps.lora_spec(steps.LLAMA_ALL, 16), f"t{t}")
    _log(f"scaling: timing {len(benches)} LoRA steps alternating, {size['sweep_steps']} rounds")
    times = alternate({b.name: b.run for b in benches.values()}, size["sweep_steps"], warmup=1)
    for (kind, x), b in benches.items():
        out[kind].append({kind: x, "median_s": times[b.name]["median_s"],
                          "xla_flops": b.info["xla_flops"], "analytic_flops": b.info["analytic_flops"],
                          "adapter_params": b.info["adapter_params"],
                          "compiled_bytes": b.info["compiled_bytes"]})
    out["config"] = {"width": w, "layers": L, "batch": B, "seq_for_rank": size["llama_seq"],
                     "rank_for_seq": 16, "targets": "all linear layers"}
    return out


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Exponent k of y ~ x^k by least squares in log-log space."""
    if len(xs) < 2 or min(xs) <= 0 or min(ys) <= 0:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)


def adapter_and_inference(model: steps.Model, adapters: Any, out_dir: str, reps: int) -> dict:
    """Section 5: saved adapter size vs its bytes; base / merged / unmerged forward times."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))  # non-zero B, so merging matters
    leaves = [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    adapters = jax.tree.unflatten(tree, leaves)
    ad_bytes = sum(int(x.nbytes) for x in leaves)
    directory = os.path.join(os.path.abspath(out_dir), "adapter")
    save_adapter(directory, adapters, {"benchmark": "minilm r=16 query/value"})
    disk = _dir_bytes(directory)
    params = model.params
    ids, mask = jnp.asarray(model.batch["code_ids"]), jnp.asarray(model.batch["code_mask"])
    fwd = jax.jit(model.fn)
    merged = block(jax.jit(lora_jax.merge)(params, adapters))
    unmerged = jax.jit(lambda p, a, i, m: lora_jax.apply(model.fn, p, a, i, m))
    diff = float(jnp.max(jnp.abs(fwd(merged, ids, mask) - unmerged(params, adapters, ids, mask))))
    times = alternate({"base": lambda: block(fwd(params, ids, mask)),
                       "merged": lambda: block(fwd(merged, ids, mask)),
                       "unmerged": lambda: block(unmerged(params, adapters, ids, mask))},
                      reps, warmup=2)
    t = {k: v["median_s"] for k, v in times.items()}
    return {"adapter_bytes": ad_bytes, "disk_bytes": disk, "directory": directory,
            "disk_over_bytes": ratio(disk, ad_bytes), "disk_overhead_bytes": disk - ad_bytes,
            "inference": {"batch": list(ids.shape), **{k: summary(v["times_s"]) for k, v in
                                                        times.items()},
                          "merged_over_base": ratio(t["merged"], t["base"]),
                          "unmerged_over_base": ratio(t["unmerged"], t["base"]),
                          "max_abs_diff_merged_vs_unmerged": diff}}
