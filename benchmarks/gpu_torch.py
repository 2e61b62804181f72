"""The PyTorch + PEFT side of `benchmarks.gpu`: one configuration per call, in a long-lived worker.

The model is what a PEFT user runs at its fastest without writing kernels: bf16 weights built
on the device, SDPA attention, bf16 autocast (adapters kept fp32, as lora_jax keeps them), AdamW,
gradient clipping, gradient checkpointing on or off. A batch that runs out of device memory is
caught and the next smaller candidate tried, in the same process.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.gpu_plan import hf_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICE = "cpu"  # "cuda" once the first configuration looks (not at import: see gpu_worker.py)
_built: dict[str, Any] = {}  # model name -> (hf model, peft model, trainable params, optimizer)


def _build(name: str, shape: dict, rank: int) -> tuple:
    if name in _built:
        return _built[name]
    _built.clear()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    cfg = {k: v for k, v in hf_config(shape).items() if k != "architectures"}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # weights born bf16 on the device: no fp32 copy
    try:
        with torch.device(DEVICE):
            hf_model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    hf_model.train()
    model = get_peft_model(hf_model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # adapters in fp32, as lora_jax keeps them
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    _built[name] = (hf_model, model, params, opt)
    return _built[name]


def _step(model, params, opt, ids) -> float:
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return float(out.loss.detach())


def _fits(model, params, opt, ids, simulate_max_batch: int | None) -> str | None:
    """Run one step at this batch; None if it ran, else why not (out of memory)."""
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        if simulate_max_batch is not None and ids.shape[0] > simulate_max_batch:
            raise torch.OutOfMemoryError(f"simulated: batch {ids.shape[0]} > {simulate_max_batch}")
        _step(model, params, opt, ids)
        return None
    except torch.OutOfMemoryError as e:
        reason = str(e).splitlines()[0][:200]
    opt.zero_grad(set_to_none=True)  # outside the handler: its frames no longer pin tensors
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return f"out of memory ({reason})"


def run(cfg: dict) -> dict:
    """Build (or reuse) the model, find the largest candidate batch that runs, then time it."""
    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    hf_model, model, params, opt = _build(cfg["model"], cfg["shape"], cfg["rank"])
    build_s = time.perf_counter() - t0
    if cfg["gc"]:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_disable()
    gen = torch.Generator().manual_seed(0)
    tried, batch = [], None
    out = {"framework": "peft", "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "gradient_checkpointing": cfg["gc"],
           "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
           "platform": DEVICE, "build_s": build_s, "tried": tried,
           "adapter_params": sum(p.numel() for p in params)}
    for b in cfg["batches"]:
        ids = torch.randint(0, cfg["shape"]["vocab_size"], (b, cfg["seq"]), generator=gen).to(DEVICE)
        t = time.perf_counter()
        why = _fits(model, params, opt, ids, cfg.get("simulate_max_batch"))
        tried.append({"batch": b, "fits": why is None, "first_step_s": time.perf_counter() - t,
                      **({"error": why} if why else {})})
        if why is None:
            batch = b
            break
    if batch is None:
        return {**out, "error": f"does not fit: every batch of {cfg['batches']} ran out of memory"}
    times, loss = [], float("nan")
    for i in range(cfg["warmup"] - 1 + cfg["steps"]):  # the search's step was the first warm-up
        t = time.perf_counter()
        loss = _step(model, params, opt, ids)
        if i >= cfg["warmup"] - 1:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None
    return {**out, "batch": batch, "times_s": times, "median_s": statistics.median(times),
            "loss": loss, "peak_bytes": peak, "first_step_s": tried[-1]["first_step_s"]}
