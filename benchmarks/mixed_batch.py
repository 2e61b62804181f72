"""Serving many adapters at once: one mixed batch vs one adapter vs a loop over adapters.

    python -m benchmarks.mixed_batch [--out DIR]

A Llama-family decoder (random weights) runs a forward over a batch whose rows use 8 different
LoRA adapters (r=16 on q/v), three ways: (1) mixed — `stack_adapters` + `adapter_index`, one
jitted call; (2) the same batch on one adapter; (3) a Python loop calling each adapter on its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
import lora_jax.models as M

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=4096,
              hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=512, rms_norm_eps=1e-5,
              tie_word_embeddings=False)


def _interleaved_medians(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed in turn each round so machine drift hits all alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def measure(k: int = 8, batch: int = 16, seq: int = 128, rank: int = 16, repeats: int = 10,
            config: dict | None = None) -> dict:
    model = M.from_config(config or CONFIG)
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, (config or CONFIG)["vocab_size"])
    mask = jnp.ones_like(ids)
    spec = lora_jax.LoraSpec(targets=M.DEFAULT_TARGETS["llama"], rank=rank, alpha=2.0 * rank)
    ads = []
    for i in range(k):
        ad = lora_jax.init(jax.random.key(i), model.fn, model.params, ids, mask, spec=spec)
        ads.append(jax.tree.map(lambda x, i=i: x + 0.01 * (i + 1), ad))
    stacked = lora_jax.stack_adapters(ads)
    index = jnp.arange(batch, dtype=jnp.int32) % k
    mixed = jax.jit(lambda s, i, x, m: lora_jax.apply(model.fn, model.params, s, x, m, adapter_index=i))
    single = jax.jit(lambda a, x, m: lora_jax.apply(model.fn, model.params, a, x, m))
    rows = [np.flatnonzero(np.asarray(index) == j) for j in range(k)]

    def loop(ids, mask):
        return [single(ads[j], ids[r], mask[r]) for j, r in enumerate(rows)]

    t = _interleaved_medians({"mixed": (mixed, (stacked, index, ids, mask)),
                              "one_adapter": (single, (ads[0], ids, mask)),
                              "loop_over_adapters": (loop, (ids, mask))}, repeats)
    t_mixed, t_single, t_loop = t["mixed"], t["one_adapter"], t["loop_over_adapters"]
    tokens = batch * seq
    return {
        "config": dict(adapters=k, batch=batch, seq=seq, rank=rank, hidden=(config or CONFIG)["hidden_size"]),
        "seconds": {"mixed": t_mixed, "one_adapter": t_single, "loop_over_adapters": t_loop},
        "tokens_per_s": {"mixed": tokens / t_mixed, "one_adapter": tokens / t_single,
                         "loop_over_adapters": tokens / t_loop},
        "mixed_over_one_adapter_throughput": t_single / t_mixed,
        "mixed_over_loop_throughput": t_loop / t_mixed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_mixed_batch")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    res = measure(repeats=args.repeats)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mixed_batch.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
