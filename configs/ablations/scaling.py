"""Scaling (rsLoRA): α/r vs α/√r across ranks at fixed α, plus an α sweep at fixed rank.

    python -m experiments.ablate --config=configs/ablations/scaling.py --workdir=runs/ablate/scaling

On the planted_rank task (the paper: Llama-scale fine-tuning), because learning curves for many
ranks need many cheap runs: a width-256 MLP with a rank-128 update planted on layers_1, so higher
rank keeps helping; ranks {4, 16, 64, 256} × {standard α/r, rslora α/√r} at α = 8, 300 steps,
then α ∈ {r/2, r, 2r, 4r} at r = 16 (standard). Measured: r=256 ends 13× lower in loss under
rslora than under α/r at 300 steps (64× at 1500); ranks ≤ 64 are capacity-bound and equal.
`:smoke`: width 64, k 32, ranks {2, 8, 32}, 60 steps.
"""

from configs.ablations import _common as cm


def get_config(arg: str | None = None):
    smoke = cm.check_arg(arg)
    if smoke:
        run, ranks, fixed = cm.planted_run(True, width=64, k=32, steps=60), [2, 8, 32], 8
    else:
        run, ranks, fixed = cm.planted_run(False, width=256, k=128, steps=300), [4, 16, 64, 256], 16
    run.lora.targets = r"layers_1/kernel"
    run.optimizer.lr = 3e-3
    alpha = 8.0
    sweep = [
        {
            "name": f"{s}_r{r}",
            "tags": {"group": "rank", "scaling": s, "rank": r, "alpha": alpha},
            "lora.scaling": s,
            "lora.rank": r,
            "lora.alpha": alpha,
        }
        for s in ("standard", "rslora")
        for r in ranks
    ]
    sweep += [
        {
            "name": f"alpha{a:g}_r{fixed}",
            "tags": {"group": "alpha", "scaling": "standard", "rank": fixed, "alpha": a},
            "lora.rank": fixed,
            "lora.alpha": a,
        }
        for a in (fixed / 2, fixed, 2.0 * fixed, 4.0 * fixed)
    ]
    return cm.ablation(
        "scaling",
        "Scaling: α/r vs α/√r (rsLoRA)",
        __doc__.split("\n\n")[0],
        run,
        sweep,
        "eval/mse",
        False,
        large_rank=ranks[1],
    )
