"""The papers' numbers (from shared/reference/peft_papers.md, section B), as markdown sections.

They are printed beside our results, never mixed into our tables: the papers used other models
(GPT-3 175B, GPT-2 M, RoBERTa, Llama-2-7B) and tasks, so only the *shape* of a trend compares.
"""

from __future__ import annotations

from lora_jax.ablate.report import md_table

NOTE = "**Paper's numbers** (different model and task; compare trends, not values)."

HU_TABLE6 = md_table(
    ["GPT-3 175B", "weights", "r=1", "r=2", "r=4", "r=8", "r=64"],
    [
        ["WikiSQL", "Wq", 68.8, 69.6, 70.5, 70.4, 70.0],
        ["WikiSQL", "Wq,Wv", 73.4, 73.3, 73.7, 73.8, 73.5],
        ["WikiSQL", "Wq,Wk,Wv,Wo", 74.1, 73.7, 74.0, 74.0, 73.9],
        ["MultiNLI", "Wq", 90.7, 90.9, 91.1, 90.7, 90.7],
        ["MultiNLI", "Wq,Wv", 91.3, 91.4, 91.3, 91.6, 91.4],
        ["MultiNLI", "Wq,Wk,Wv,Wo", 91.2, 91.7, 91.7, 91.5, 91.4],
    ],
)

HU_TABLE18 = md_table(
    ["r (GPT-2 M, E2E)", "val_loss", "BLEU"],
    [
        [1, 1.23, 68.72],
        [2, 1.21, 69.17],
        [4, 1.18, 70.38],
        [8, 1.17, 69.57],
        [16, 1.16, 69.61],
        [32, 1.16, 69.33],
        [64, 1.16, 69.24],
        [128, 1.16, 68.73],
        [256, 1.16, 68.92],
        [512, 1.16, 68.78],
        [1024, 1.17, 69.37],
    ],
)

HU_TABLE5 = md_table(
    ["18M budget (GPT-3)", "Wq", "Wk", "Wv", "Wo", "Wq,Wk", "Wq,Wv", "Wq,Wk,Wv,Wo"],
    [
        ["r", 8, 8, 8, 8, 4, 4, 2],
        ["WikiSQL (±0.5)", 70.4, 70.0, 73.0, 73.2, 71.4, 73.7, 73.7],
        ["MultiNLI (±0.1)", 91.0, 90.8, 91.0, 91.3, 91.3, 91.3, 91.7],
    ],
)

HU_TABLE16 = md_table(
    ["GPT-3 MNLI-m, n train", 100, "1k", "10k", "392k"],
    [["LoRA (r_q=r_v=8)", 63.8, 85.6, 89.2, 91.7], ["full FT", 60.2, 85.8, 88.9, 89.5]],
)

HU_TABLE7 = md_table(
    ["GPT-3 layer 48, Wq", "‖ΔWq‖_F", "‖UᵀWqVᵀ‖ (ΔWq dirs)", "(Wq dirs)", "(random)", "amplification"],
    [["r=4", 6.91, 0.32, 21.67, 0.02, 21.5], ["r=64", 3.57, 1.90, 37.71, 0.33, 1.9]],
)

RANK_TARGETS = f"""{NOTE}

Hu et al. Table 6 (validation accuracy vs r and target weights):

{HU_TABLE6}

Hu et al. Table 18 (effect of r; tuned at r=4; best val loss at r=16, best BLEU at r=4):

{HU_TABLE18}

Hu et al. Table 5 (fixed parameter budget: more weight types at lower rank beats one at higher rank):

{HU_TABLE5}

Hu et al. Table 16 (low data):

{HU_TABLE16}
"""

SCALING = f"""{NOTE}

rsLoRA (Kalajdzievski 2023): with γ = α/r, learning curves for r = 4 … 2048 almost coincide
(gradient collapse, no gain from rank); with γ = α/√r larger r gives lower loss. Reported: LoRA r=4
perplexity 1.863 vs rsLoRA r=2048 1.836; MT-Bench (OpenChat 3.5, DPO) base 7.79, LoRA r=16 7.93,
LoRA r=256 7.96, rsLoRA r=256 8.09. Hu et al.: α is set to the first r tried and not tuned (with
Adam, tuning α ≈ tuning the learning rate); Biderman et al. recommend α = 2r.
"""

SUBSPACE = f"""{NOTE}

Hu et al. §7.2 (GPT-3, layer 48 of 96): between A_(r=8) and A_(r=64), the top direction is shared,
φ(1, 1) > 0.5 for both ΔWq and ΔWv, and other directions barely overlap (Fig. 3). Between two seeds
at r=64, ΔWq shares more top directions than ΔWv (Fig. 4). Two random Gaussian matrices share no
directions (the control).
"""

AMPLIFICATION = f"""{NOTE}

Hu et al. Table 7 (U, V: top-r singular directions of ΔWq, of Wq, or random; ‖Wq‖_F = 61.95):

{HU_TABLE7}

ΔW amplifies directions that W contains but does not emphasise; the factor is large at small r (≈21.5
at r=4) and small at r=64 (≈1.9).
"""

FORGETTING = f"""{NOTE}

Biderman et al. 2024 (Llama-2-7B): LoRA underperforms full fine-tuning on the target domain and
forgets less of the source domain; both lie on one learning–forgetting curve. Forgetting score at the
HumanEval peak for code CPT: full FT 0.54 vs LoRA 0.64 (higher = less forgetting); code IFT LoRA 0.63
vs FT 0.45; math IFT 0.63 vs 0.57. Full-FT ΔW is high rank, 10–100× typical LoRA ranks: ~1000–2000
of 4096 dimensions explain 90% of an attention ΔW, ~2000–2800 for MLP (blog summary of §4.5).
"""

PLANTED = f"""{NOTE}

There is no paper number for this synthetic task. It tests Hu et al.'s hypothesis that the update
has a low "intrinsic rank": with a planted rank-k update, the error should drop sharply at r = k
(Hu et al. Table 6: r=1 already suffices for Wq,Wv on GPT-3).
"""

LORAPLUS_INIT = f"""{NOTE}

LoRA+ (Hayou et al. 2024): η_B = λ·η_A with λ ≫ 1 gives 1–2% better results and up to ~2× faster
fine-tuning at the same compute; PEFT's example uses λ = 16 and notes the base lr may need to be
~2× lower. Hu et al. initialise A with a random Gaussian and B = 0; PEFT's default A init is
Kaiming-uniform. No paper reports a kaiming-vs-gaussian gap.
"""

VARIANTS = f"""{NOTE}

- DoRA (Liu et al. 2024): +3.7 points over LoRA on LLaMA-7B commonsense reasoning (74.7 → 78.4),
  +4.4 on LLaMA-3-8B, at equal rank; PEFT measured a ~20%–2× slower training step.
- PiSSA (Meng et al. 2024): faster convergence and a higher final metric than LoRA (Mistral-7B
  GSM8K 72.86% vs 67.7%).
- OLoRA (Büyükakyüz 2024): faster convergence than LoRA from an orthonormal (QR) start.
- rsLoRA (Kalajdzievski 2023): α/√r keeps learning at large ranks (r=2048 perplexity 1.836 vs
  LoRA r=4 1.863); with α/r large ranks learn no better than small ones.
- LoRA+ (Hayou et al. 2024): η_B = λ·η_A (λ ≈ 16) gives 1–2% better results and up to ~2×
  faster fine-tuning.
"""
