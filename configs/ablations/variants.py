"""LoRA variants ranked: LoRA, rsLoRA, LoRA+, DoRA, PiSSA, OLoRA (r ∈ {4, 16}) and full FT, 3 seeds.

    python -m experiments.ablate --config=configs/ablations/variants.py --workdir=runs/ablate/variants
    python -m experiments.pretrain --config=configs/lm/pretrain.py        # the lm base, once (cached)
    python -m experiments.ablate --config=configs/ablations/variants.py:lm --workdir=runs/ablate/variants_lm

Default: MiniLM code search shrunk as _common.code_search_run (q,v; 40 steps of batch 16), final
eval/mrr. `:lm`: the causal_lm adaptation of configs/lm/lora.py (all linear weights) for 50
steps, target loss (learning) and source loss (forgetting). Every variant keeps LoRA's α = 2r and
learning rate, except LoRA+ (η_B = 16·η_A at half the base rate, as PEFT's example) and full
fine-tuning (a tenth of it). `:smoke`: the planted-rank MLP, 2 seeds of LoRA, DoRA, PiSSA and full FT.
"""

from configs.ablations import _common as cm
from configs.lm import lora as lm_lora

VARIANTS = {
    "lora": {},
    "rslora": {"lora.scaling": "rslora"},
    "loraplus": {"optimizer.loraplus_ratio": 16.0, "lr_factor": 0.5},
    "dora": {"lora.dora": True},
    "pissa": {"lora.init": "pissa"},
    "olora": {"lora.init": "olora"},
}


def _run(arg: str | None):
    if arg == "lm":
        run = lm_lora.get_config(None)
        # 50 steps: ~45 s a run on 2 cores (100 took 82 s, 53 min for the sweep)
        run.steps, run.log_every, run.ckpt_every, run.keep_checkpoints = 50, 5, 50, 1
        run.optimizer.warmup_steps = 5
        return run, "eval/target_loss", False
    if cm.check_arg(arg):
        return cm.planted_run(True, steps=40), "eval/mse", False
    run = cm.code_search_run()
    run.eval_at_start = False  # the base's MRR is the same for every run (0.490); ~10 s a run
    return run, "eval/mrr", True


def get_config(arg: str | None = None):
    run, metric, higher = _run(arg)
    smoke = arg == "smoke"
    names = ["lora", "dora", "pissa"] if smoke else list(VARIANTS)
    ranks, seeds = ([4], [0, 1]) if smoke else ([4, 16], [0, 1, 2])
    lr = run.optimizer.lr
    sweep = []
    for v in names:
        over = dict(VARIANTS[v])
        factor = over.pop("lr_factor", 1.0)
        for r in ranks:
            for s in seeds:
                sweep.append({"name": f"{v}_r{r}_s{s}", "tags": {"variant": v, "rank": r, "seed": s},
                              "lora.rank": r, "lora.alpha": float(2 * r), "seed": s,
                              "optimizer.lr": lr * factor, **over})
    sweep += [{"name": f"full_s{s}", "tags": {"variant": "full", "rank": "full", "seed": s},
               "method": "full", "seed": s, "optimizer.lr": lr / 10} for s in seeds]
    return cm.ablation(
        "variants",
        "LoRA variants at equal rank and step budget",
        __doc__.split("\n\n")[0],
        run,
        sweep,
        metric,
        higher,
        **({"source_key": "eval/source_loss"} if arg == "lm" else {}),
    )
