"""Rank × target weights (Hu et al. Tables 5, 6, 18, 16) on MiniLM code search.

    python -m experiments.ablate --config=configs/ablations/rank_targets.py --workdir=runs/ablate/rank_targets
    python -m experiments.ablate --config=configs/ablations/rank_targets.py:smoke --workdir=/tmp/rt

Shrunk versus the paper to fit ~60 min on 2 CPU cores: ranks {1, 4, 16, 64} (the paper: 1..64 on
GPT-3, 1..1024 on GPT-2), 40 steps of batch 16 at 32/64 tokens (see _common.code_search_run) instead
of epochs; α = 2r so the branch scale is the same at every rank. Plus one full fine-tuning run, a
fixed per-layer budget of 6,144 params (q r=8, q,v r=4, q,k,v,o r=2; all-linear r=1 is 6,912,
the closest it gets), and a low-data mode: 256 training pairs, 4 epochs, r=16 vs r=128 on q,v
over 3 seeds. `:smoke` runs the same analysis on the planted-rank MLP (seconds per run).
"""

from configs.ablations import _common as cm


def _lora(name: str, targets: dict, t: str, rank: int, mode: str, **extra) -> dict:
    tags = {"mode": mode, "targets": t, "rank": rank, **extra.pop("tags", {})}
    return {
        "name": name,
        "tags": tags,
        "lora.targets": targets[t],
        "lora.rank": rank,
        "lora.alpha": float(2 * rank),
        **extra,
    }


def get_config(arg: str | None = None):
    smoke = cm.check_arg(arg)
    targets = cm.PLANTED_TARGETS if smoke else cm.BERT_TARGETS
    if smoke:
        run, ranks, grid_targets = cm.planted_run(True, steps=40), [1, 4], ["l1", "all"]
        budget = [("l1", 4), ("all", 1)]
        low = {"ranks": [2, 8], "seeds": [0], "set": {}, "examples": "n/a (fresh draws)"}
        full_lr = 1e-3
    else:
        run, ranks, grid_targets = cm.code_search_run(), [1, 4, 16, 64], list(targets)
        budget = [("q", 8), ("q,v", 4), ("q,k,v,o", 2), ("all linear", 1)]
        low = {
            "ranks": [16, 128],
            "seeds": [0, 1, 2],
            "examples": 256,
            "set": {"code_search.max_train": 256, "steps": 64},
        }
        full_lr = 1e-4
    sweep = [
        _lora(f"{t.replace(',', '').replace(' ', '_')}_r{k}", targets, t, k, "rank")
        for t in grid_targets
        for k in ranks
    ]
    sweep.append(
        {
            "name": "full_ft",
            "tags": {"mode": "full", "targets": "all", "rank": "full"},
            "method": "full",
            "optimizer.lr": full_lr,
        }
    )
    sweep += [
        _lora(f"budget_{t.replace(',', '').replace(' ', '_')}_r{k}", targets, t, k, "budget")
        for t, k in budget
    ]
    low_t = "l1" if smoke else "q,v"
    sweep += [
        _lora(
            f"lowdata_r{k}_s{s}",
            targets,
            low_t,
            k,
            "lowdata",
            seed=s,
            tags={"seed": s, "examples": low["examples"]},
            **low["set"],
        )
        for s in low["seeds"]
        for k in low["ranks"]
    ]
    metric, higher = ("eval/mse", False) if smoke else ("eval/mrr", True)
    return cm.ablation(
        "rank_targets",
        "Rank × target weights (Hu et al. Tables 5, 6, 18)",
        __doc__.split("\n\n")[0] + ("  [smoke: planted-rank MLP]" if smoke else ""),
        run,
        sweep,
        metric,
        higher,
        small_rank=low["ranks"][0],
        large_rank=low["ranks"][1],
    )
