"""Learning vs forgetting (Biderman et al. 2024) on the causal_lm task: target gain vs source loss.

    python -m experiments.pretrain --config=configs/lm/pretrain.py        # the base, once (cached)
    python -m experiments.ablate --config=configs/ablations/forgetting.py --workdir=runs/ablate/forgetting

The base is a small byte-level Llama pretrained on the stdlib's sources (source corpus); it is adapted
to pydoc's help topics (target corpus) by LoRA r ∈ {4, 16, 64} on all linear weights (α = 2r, lr 2e-3)
and by full fine-tuning at lr 5e-4 and 1e-4, plus LoRA r=16 at those two learning rates; 300
steps each (configs/lm/lora.py) — the paper: Llama-2-7B, billions of tokens. Also: the rank of
the full-FT ΔW that holds 90% of its spectrum.
`:smoke` adapts the `pretrain.py:smoke` base (make it with that variant first) for 20 steps.
"""

from configs.ablations import _common as cm
from configs.lm import lora


def get_config(arg: str | None = None):
    smoke = cm.check_arg(arg)
    run = lora.get_config(arg)
    run.keep_checkpoints = 1
    ranks, full_lrs = ([4], [5e-4]) if smoke else ([4, 16, 64], [5e-4, 1e-4])
    sweep = [
        {"name": f"lora_r{r}", "tags": {"rank": r}, "lora.rank": r, "lora.alpha": float(2 * r)} for r in ranks
    ]
    if not smoke:  # LoRA at full fine-tuning's learning rates, to compare frontiers at matched lr
        sweep += [
            {"name": f"lora_r16_lr{lr:g}", "tags": {"rank": 16}, "lora.rank": 16, "lora.alpha": 32.0,
             "optimizer.lr": lr}
            for lr in (5e-4, 1e-4)
        ]
    sweep += [
        {"name": f"full_lr{lr:g}", "tags": {"rank": "full"}, "method": "full", "optimizer.lr": lr}
        for lr in full_lrs
    ]
    return cm.ablation(
        "forgetting",
        "Learning vs forgetting (Biderman et al. 2024)",
        __doc__.split("\n\n")[0],
        run,
        sweep,
        "eval/target_loss",
        False,
        target_key="eval/target_loss",
        source_key="eval/source_loss",
        spectrum_targets=run.lora.targets,
        fraction=0.9,
    )
