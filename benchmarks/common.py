"""Shared pieces of the benchmark suite: timing, machine description, the optimizer config.

Timings on a shared CPU drift, so every comparison is timed *alternating* its contenders step by
step (`alternate`) and reported as medians; ratios are only ever taken within one such group.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def optimizer_config(**overrides: Any) -> SimpleNamespace:
    """configs/base.py's optimizer defaults (AdamW, clip 1.0), without importing configs/."""
    cfg = dict(lr=1e-3, warmup_steps=10, end_lr_ratio=0.0, weight_decay=0.0, clip_norm=1.0,
               b1=0.9, b2=0.999, loraplus_ratio=1.0)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def alternate(runners: dict[str, Callable[[], None]], steps: int, warmup: int = 1) -> dict[str, dict]:
    """Run each contender `warmup` times, then `steps` rounds of one step each in turn.

    Alternating makes slow machine drift (other users, thermal) hit every contender alike.
    Returns {name: {"median_s", "min_s", "times_s"}}.
    """
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(steps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {k: summary(v) for k, v in times.items()}


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times),
            "times_s": [round(t, 5) for t in times]}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch",
                "transformers", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load while the suite started."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
        "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
    }


def matmul_rate(n: int = 2048, reps: int = 10) -> dict:
    """Achieved FLOP/s of one large dense fp32 matmul: the machine's practical ceiling."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    res = alternate({"matmul": lambda: block(f(a, b))}, reps, warmup=2)["matmul"]
    flops = 2.0 * n**3
    return {"n": n, "flops": flops, **res, "flops_per_s": flops / res["median_s"]}


def tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def compiled_costs(compiled: Any) -> dict:
    """XLA's cost (FLOPs) and memory analysis (argument/temp/output bytes) of an executable."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return {
        "xla_flops": float(cost.get("flops", 0.0)),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
        "compiled_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
    }


def ratio(a: float, b: float) -> float | None:
    return None if not b else a / b


def write_results(out_dir: str, name: str, res: dict, text: str) -> None:
    """out_dir/<name>.json and out_dir/<name>.md, and the markdown on stdout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
