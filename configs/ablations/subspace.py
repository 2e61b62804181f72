"""Subspace similarity (Hu et al. §7.2, Figs 3-4): φ between A of r=8 and r=64, and two seeds at r=64.

    python -m experiments.ablate --config=configs/ablations/subspace.py --workdir=runs/ablate/subspace

MiniLM code search, q,v (as the paper), 3 runs of 500 steps of batch 16 at 32/64 tokens (the paper:
GPT-3 to convergence); heatmaps per layer and weight type, with two random Gaussian matrices as the
control. The seed sets A's init and the data order. `:smoke`: the planted-rank MLP, ranks 4 and 16
(there the seed also changes the teacher, so the seed pair is not meaningful; it only exercises the code).
"""

from configs.ablations import _common as cm


def get_config(arg: str | None = None):
    smoke = cm.check_arg(arg)
    if smoke:
        run, small, large = cm.planted_run(True, steps=40), 4, 16
        run.lora.targets = cm.PLANTED_TARGETS["all"]
        metric, higher = "eval/mse", False
    else:
        run, small, large = cm.code_search_run(), 8, 64
        run.steps, run.ckpt_every, run.log_every = 500, 100, 10
        metric, higher = "eval/mrr", True
    sweep = [
        {
            "name": f"r{r}_s{s}",
            "tags": {"rank": r, "seed": s},
            "lora.rank": r,
            "lora.alpha": float(2 * r),
            "seed": s,
        }
        for r, s in ((small, 0), (large, 0), (large, 1))
    ]
    pairs = [
        [f"r{small}_s0", f"r{large}_s0", f"r={small} vs r={large}"],
        [f"r{large}_s0", f"r{large}_s1", f"r={large} seed 0 vs seed 1"],
    ]
    return cm.ablation(
        "subspace",
        "Subspace similarity between adapters (Hu et al. §7.2)",
        __doc__.split("\n\n")[0],
        run,
        sweep,
        metric,
        higher,
        pairs=pairs,
        control_seed=0,
    )
