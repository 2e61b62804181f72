"""FLOPs and compiled memory of a LoRA gradient step against full fine-tuning (XLA's own counts).

    python -m benchmarks.flops [--width 1024 --layers 4 --rows 4096 --rank 16]

Cost analysis and memory analysis are deterministic properties of the compiled program, so the
tests assert on them (tests/test_cost.py) while wall times live only in benchmark reports.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import lora_jax


def mlp_fn(params: dict, x_NxD: jax.Array) -> jax.Array:
    for i in range(len(params)):
        x_NxD = jnp.tanh(x_NxD @ params[f"w{i}"])
    return x_NxD


def compile_costs(step, *args) -> dict:
    """XLA's FLOPs and buffer sizes for `step` compiled on `args` (arrays or ShapeDtypeStructs)."""
    compiled = jax.jit(step).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return {
        "flops": float(cost["flops"]),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
    }


def measure(width: int = 1024, layers: int = 4, rows: int = 4096, rank: int = 16) -> dict:
    """Compile the forward, the full fine-tuning gradient and the LoRA gradient; count them."""
    sds = jax.ShapeDtypeStruct
    params = {f"w{i}": sds((width, width), jnp.float32) for i in range(layers)}
    x = sds((rows, width), jnp.float32)
    spec = lora_jax.LoraSpec(targets=r"w\d+", rank=rank, alpha=float(rank))
    adapters = jax.eval_shape(
        lambda p, x: lora_jax.init(jax.random.key(0), mlp_fn, p, x, spec=spec), params, x
    )
    loss_full = lambda p, x: jnp.mean(mlp_fn(p, x) ** 2)
    loss_lora = lambda a, p, x: jnp.mean(lora_jax.apply(mlp_fn, p, a, x) ** 2)
    weight_bytes = 4 * width * width * layers
    out = {
        "config": dict(width=width, layers=layers, rows=rows, rank=rank),
        "weight_bytes": weight_bytes,
        "adapter_bytes": 4 * lora_jax.count_params(adapters),
        "forward": compile_costs(mlp_fn, params, x),
        "full_grad": compile_costs(jax.grad(loss_full), params, x),
        "lora_grad": compile_costs(jax.grad(loss_lora), adapters, params, x),
    }
    full, lora = out["full_grad"], out["lora_grad"]
    out["flops_ratio_lora_over_full"] = lora["flops"] / full["flops"]
    out["live_bytes_ratio_lora_over_full"] = (lora["temp_bytes"] + lora["output_bytes"]) / (
        full["temp_bytes"] + full["output_bytes"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("width", 1024), ("layers", 4), ("rows", 4096), ("rank", 16)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    res = measure(args.width, args.layers, args.rows, args.rank)
    print(json.dumps(res, indent=2))
    print(f"LoRA/full gradient-step FLOPs: {res['flops_ratio_lora_over_full']:.3f} "
          "(floor ~2/3: forward + activation gradients)")
    print(f"LoRA/full live bytes (temp + outputs): {res['live_bytes_ratio_lora_over_full']:.3f}")


if __name__ == "__main__":
    main()
