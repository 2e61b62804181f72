"""Amplification factor (Hu et al. Table 7): ‖ΔW‖_F / ‖UᵀWVᵀ‖_F for ΔW's top-r directions vs random.

    python -m experiments.ablate --config=configs/ablations/amplification.py --workdir=runs/ablate/amp

MiniLM code search, q,v, r ∈ {4, 16, 64}, 500 steps of batch 16 at 32/64 tokens (the paper: GPT-3,
layer 48 of 96, to convergence); per layer and weight type, plus W's own top-r directions.
`:smoke`: the planted-rank MLP (random W), r ∈ {2, 8}.
"""

from configs.ablations import _common as cm


def get_config(arg: str | None = None):
    smoke = cm.check_arg(arg)
    if smoke:
        run, ranks, metric, higher = cm.planted_run(True, steps=40), [2, 8], "eval/mse", False
        run.lora.targets = cm.PLANTED_TARGETS["all"]
    else:
        run, ranks, metric, higher = cm.code_search_run(), [4, 16, 64], "eval/mrr", True
        run.steps, run.ckpt_every, run.log_every = 500, 100, 10
    sweep = [
        {"name": f"r{r}", "tags": {"rank": r}, "lora.rank": r, "lora.alpha": float(2 * r)} for r in ranks
    ]
    return cm.ablation(
        "amplification",
        "Amplification factor (Hu et al. Table 7)",
        __doc__.split("\n\n")[0],
        run,
        sweep,
        metric,
        higher,
        seed=0,
    )
