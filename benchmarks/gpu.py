"""One prepared accelerator check: a ~1B Llama in bf16, LoRA r=16 on every linear layer, seq 2048.

    python -m benchmarks.gpu --out runs/gpu            # on one GPU (e.g. H200); <= 8 minutes
    python -m benchmarks.gpu --out /tmp/gpu --small    # same code path, tiny shapes, on CPU

Reports tokens/s, model-FLOPs utilisation (analytic matmul FLOPs of a LoRA step -- forward,
activation gradients, adapter gradients; recompute not counted) against the chip's bf16 peak,
and peak memory; then the same model in PyTorch + PEFT if torch sees the device. Each side runs
in its own subprocess with a time limit, so memory and peaks do not mix and a hang cannot eat
the device budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# TinyLlama-1.1B's shape: d 2048, SwiGLU 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000.
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4, vocab_size=32000, batch=8, seq=2048, steps=10)
SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=1024, batch=2, seq=128, steps=3)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
TORCH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf(c: dict) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            **{k: c[k] for k in keys}}


def model_flops(c: dict, rank: int) -> dict:
    """Analytic matmul FLOPs per step: LoRA (no weight grads of W) and full fine-tuning."""
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = D // c["num_attention_heads"] * c["num_key_value_heads"]
    lin = L * (2 * D * D + 2 * D * kv + 3 * D * F) + D * V
    tok, T = c["batch"] * c["seq"], c["seq"]
    lin_fwd, att_fwd = 2.0 * tok * lin, 4.0 * tok * T * D * L
    adapter = L * rank * ((D + D) * 2 + (D + kv) * 2 + 2 * (D + F) + (F + D))
    return {"params": lin + D * V, "adapter_params": adapter, "forward": lin_fwd + att_fwd,
            "lora": 2 * lin_fwd + 3 * att_fwd + 6.0 * tok * adapter, "full": 3 * (lin_fwd + att_fwd)}


def run_jax(c: dict, rank: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lora_jax
    from benchmarks.common import optimizer_config
    from benchmarks.steps import LLAMA_ALL
    from lora_jax.models import from_config
    from lora_jax.models.lm_loss import next_token_fn
    from lora_jax.tasks.causal_lm import training_loss
    from lora_jax.train_step import TrainState, make_optimizer, make_train_step, model_apply

    t0 = time.perf_counter()
    m = from_config(hf(c), seed=0, dtype=jnp.bfloat16, scan_layers=True, remat=True,
                    attention=c.get("attention", "xla"))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, c["vocab_size"], (c["batch"], c["seq"])), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    fn = next_token_fn(m)  # training: the head applied per sequence chunk, no fp32 [B,T,V] logits
    spec = lora_jax.LoraSpec(targets=LLAMA_ALL, rank=rank, alpha=2.0 * rank)
    adapters = lora_jax.init(jax.random.key(1), fn, m.params, ids, batch["attention_mask"], spec=spec)
    trainable = {"adapters": adapters, "extra": {}}
    tx, schedule = make_optimizer(optimizer_config(), 1000)
    state = TrainState(step=jnp.int32(0), trainable=trainable, frozen=m.params,
                       opt_state=jax.jit(tx.init)(trainable), rng=jax.random.key(2))
    step = make_train_step(model_apply("lora", fn), training_loss, tx, schedule, 1, use_rng=False)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    setup_s = time.perf_counter() - t0
    times = []
    for i in range(c["steps"] + 2):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(jax.block_until_ready(metrics["loss"]))
        if i >= 2:
            times.append(time.perf_counter() - t)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    mem = compiled.memory_analysis()
    return {"framework": "lora_jax", "device": dev.device_kind, "platform": dev.platform,
            "setup_s": setup_s, "times_s": times, "median_s": statistics.median(times), "loss": loss,
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "compiled_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
            "adapter_params": lora_jax.count_params(adapters), "remat": True, "scan_layers": True,
            "attention": c.get("attention", "xla"), "lm_loss": "chunked",
            "matmul_bf16_flops_per_s": _matmul_rate() if dev.platform == "cpu" else None}


def _matmul_rate(n: int = 1024) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, a))
    t = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(f(a, a))
    return 2 * n**3 * 5 / (time.perf_counter() - t)


def run_torch(c: dict, rank: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = {k: v for k, v in hf(c).items() if k != "architectures"}
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    model = model.to(device=device, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=TORCH_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # adapters in fp32, as lora_jax keeps them
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ids = torch.randint(0, c["vocab_size"], (c["batch"], c["seq"]), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, loss = [], 0.0
    for i in range(c["steps"] + 2):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        loss = float(out.loss)
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"framework": "peft", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "setup_s": time.perf_counter() - t0 - sum(times), "times_s": times,
            "median_s": statistics.median(times), "loss": loss, "peak_bytes": peak,
            "adapter_params": sum(p.numel() for p in params), "gradient_checkpointing": True}


def _child(part: str, c: dict, rank: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--part", part, "--config", json.dumps(c),
           "--rank", str(rank)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        err = [ln for ln in p.stderr.strip().splitlines() if "JAX_TRACEBACK_FILTERING" not in ln]
        return {"error": f"exit {p.returncode}: " + " | ".join(err[-3:])[-1500:]}
    return json.loads(lines[-1][7:])


def _derive(r: dict, c: dict, fl: dict, peak: float | None) -> None:
    if "median_s" not in r:
        return
    r["tokens_per_s"] = c["batch"] * c["seq"] / r["median_s"]
    r["model_flops_per_s"] = fl["lora"] / r["median_s"]
    r["mfu"] = r["model_flops_per_s"] / peak if peak else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke of the same path)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak; default by device")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--attention", default=None,
                    help="attention kernels to time, comma-separated (cudnn needs an NVIDIA GPU); "
                         "default xla,cudnn, or xla with --small")
    ap.add_argument("--part", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # child process: one side, result as one JSON line
        fn = run_jax if args.part == "jax" else run_torch
        print("RESULT " + json.dumps(fn(json.loads(args.config), args.rank)), flush=True)
        return
    c = dict(SMALL if args.small else BIG)
    if args.batch:
        c["batch"] = args.batch
    t0 = time.perf_counter()
    fl = model_flops(c, args.rank)
    kernels = (args.attention or ("xla" if args.small else "xla,cudnn")).split(",")
    res = {"config": c, "rank": args.rank, "flops": fl}
    for k in kernels:
        res["jax" if k == "xla" else f"jax_{k}"] = _child("jax", {**c, "attention": k}, args.rank, 200)
    jax_sides = [s for s in res if s.startswith("jax")]
    kind = res[jax_sides[0]].get("device", "")
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else
            next((v for k, v in PEAK_BF16.items() if k in kind), None)
            or res[jax_sides[0]].get("matmul_bf16_flops_per_s"))
    res["peak_flops_per_s"] = peak
    if not args.skip_torch:
        res["peft"] = _child("torch", c, args.rank, 180)
    sides = [*jax_sides, "peft"]
    for side in sides:
        if side in res:
            _derive(res[side], c, fl, peak)
    for side in jax_sides:
        if "tokens_per_s" in res[side] and "tokens_per_s" in res.get("peft", {}):
            res[f"{side}_over_peft_step_time"] = res[side]["median_s"] / res["peft"]["median_s"]
    res["elapsed_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"model {fl['params'] / 1e9:.2f}B params, batch {c['batch']} x seq {c['seq']}, "
             f"LoRA r={args.rank} "
             f"all linear ({fl['adapter_params']:,} adapter params); peak {peak or 0:.3g} FLOP/s"]
    for side in sides:
        r = res.get(side)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"{side}: {r['error']}")
            continue
        pk = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "n/a"
        lines.append(f"{side} on {r['device']}: step {r['median_s']:.4f} s, {r['tokens_per_s']:,.0f} tok/s, "
                     f"MFU {r['mfu'] or 0:.3f}, peak memory {pk}, setup {r['setup_s']:.0f} s")
    lines.append(f"total {res['elapsed_s']:.0f} s")
    with open(os.path.join(args.out, "gpu_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
