"""LoRA+ ratio sweep (η_B/η_A ∈ {1, 2, 4, 8, 16}) × A init (kaiming vs gaussian) on MiniLM code search.

    python -m experiments.ablate --config=configs/ablations/loraplus_init.py --workdir=runs/ablate/loraplus

Shrunk: q,v at r=16, 40 steps of batch 16 at 32/64 tokens (see _common.code_search_run), base lr
5e-4 (PEFT: ~2× lower than plain LoRA's 1e-3, since B's step is up to 16× larger). 10 runs.
`:smoke`: the planted-rank MLP, ratios {1, 4}, both inits.
"""

from configs.ablations import _common as cm


def get_config(arg: str | None = None):
    smoke = cm.check_arg(arg)
    if smoke:
        run, ratios, metric, higher = cm.planted_run(True, steps=40), [1.0, 4.0], "eval/mse", False
    else:
        run, ratios, metric, higher = cm.code_search_run(), [1.0, 2.0, 4.0, 8.0, 16.0], "eval/mrr", True
        run.optimizer.lr = 5e-4
    sweep = [
        {
            "name": f"{init}_ratio{r:g}",
            "tags": {"init": init, "ratio": r},
            "lora.init": init,
            "optimizer.loraplus_ratio": r,
        }
        for init in ("kaiming", "gaussian")
        for r in ratios
    ]
    return cm.ablation(
        "loraplus_init",
        "LoRA+ learning-rate ratio and A initialisation",
        __doc__.split("\n\n")[0],
        run,
        sweep,
        metric,
        higher,
    )
