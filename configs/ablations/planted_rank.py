"""Intrinsic rank on the planted_rank task: the error vs rank curve has its knee at the planted k.

    python -m experiments.ablate --config=configs/ablations/planted_rank.py --workdir=runs/ablate/planted_rank

Full: k ∈ {2, 4, 8} planted on layers_1 of a width-64 tanh MLP, r ∈ {1,2,3,4,6,8,12,16}, 600 steps
(24 runs; measured 76 s in all). `:smoke`: k = 2, ranks {1, 2, 4}, 150 steps. Synthetic: no paper numbers.
"""

from configs.ablations import _common as cm


def get_config(arg: str | None = None):
    smoke = cm.check_arg(arg)
    ks, ranks, steps = ([2], [1, 2, 4], 150) if smoke else ([2, 4, 8], [1, 2, 3, 4, 6, 8, 12, 16], 600)
    run = cm.planted_run(smoke, steps=steps)
    run.lora.targets = r"layers_1/kernel"
    sweep = [
        {
            "name": f"k{k}_r{r}",
            "tags": {"k": k, "rank": r},
            "planted_rank.planted_k": k,
            "lora.rank": r,
            "lora.alpha": float(r),
        }
        for k in ks
        for r in ranks
    ]
    return cm.ablation(
        "planted_rank",
        "Intrinsic rank: knee at the planted k",
        __doc__.split("\n\n")[0],
        run,
        sweep,
        "eval/mse",
        False,
        knee_threshold=0.01,
    )
