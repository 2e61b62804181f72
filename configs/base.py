"""Every config field, declared once with its meaning. Experiment configs change only what differs.

Each comment starts with the field's allowed values in brackets; `lora_jax/config_check.py`
holds every run to them before anything is written. A bracket is a type with optional bounds
(`int >= 1`, `0 <= float < 1`), choices (`lora|full`), a named kind (`regex`, `task`,
`hf model`, ...: see lora_jax/config_rules.py) or alternatives joined by `or` (`regex or ""`).

Variants go after a colon: `--config=configs/r16.py:smoke` shrinks any config to a run of a
minute or two on CPU (same code path, fewer steps and examples).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # [int >= 0] seeds adapter init, dropout and data order
    c.task = "code_search"  # [task] module in lora_jax/tasks: code_search, planted_rank, causal_lm, jsonl_*
    c.method = "lora"  # [lora|full] train adapters only, or fine-tune every weight in the same loop
    c.resume = True  # [bool] resume from <workdir>/ckpt; False starts over, clearing that workdir's run

    c.model = ml_collections.ConfigDict()
    c.model.path = "sentence-transformers/all-MiniLM-L6-v2"  # [hf model] an HF directory or hub id
    c.model.dtype = "float32"  # [float32|bfloat16] base weights (adapters stay float32)
    c.model.scan_layers = False  # [bool] one nn.scan over the layers: one compiled layer, stacked weights
    c.model.remat = "none"  # [none|full|save_dots|save_dots_except_mlp] backward recompute
    c.model.quant = "none"  # [none|nf4|fp4|int8] frozen linear kernels stored as bitsandbytes does (QLoRA)
    c.model.attention = "auto"  # [auto|xla|cudnn] auto: cuDNN flash attention on NVIDIA GPUs, bf16; else XLA
    c.model.dropout = False  # [bool] the checkpoint's own dropout while training (BERT family, as HF trains)

    c.lora = ml_collections.ConfigDict()
    c.lora.targets = r".*/(query|value)/kernel"  # [regex] over "/"-joined param paths
    c.lora.rank = 16  # [int >= 1] r
    c.lora.alpha = 32.0  # [float > 0] α: the branch is scaled by α/r (or α/√r)
    c.lora.scaling = "standard"  # [standard|rslora] α/r or α/√r
    c.lora.init = "kaiming"  # [lora init] kaiming|gaussian (B = 0), pissa|pissa_niter_K|olora (A, B from W)
    c.lora.dropout = 0.0  # [0 <= float < 1] dropout on the LoRA branch's input while training
    c.lora.dora = False  # [bool] DoRA: also train a magnitude per output unit, W' = m·(W+ΔW)/‖W+ΔW‖
    c.lora.train_also = ""  # [regex or ""] base weights trained in full beside the adapters (e.g. a new head)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-3  # [float > 0] peak learning rate (of A under LoRA+)
    c.optimizer.warmup_steps = 10  # [int >= 0] linear warm-up from 0; fewer than steps when steps > 0
    c.optimizer.end_lr_ratio = 0.0  # [0 <= float <= 1] cosine decays to lr * end_lr_ratio at the last step
    c.optimizer.weight_decay = 0.0  # [float >= 0] AdamW decoupled weight decay on matrices (ndim >= 2)
    c.optimizer.clip_norm = 1.0  # [float >= 0] global gradient-norm clipping; 0 disables
    c.optimizer.b1 = 0.9  # [0 <= float < 1] Adam β1
    c.optimizer.b2 = 0.999  # [0 <= float < 1] Adam β2
    c.optimizer.loraplus_ratio = 1.0  # [float > 0] LoRA+: B's learning rate is this multiple of A's

    c.batch_size = 32  # [int >= 1] global batch (examples per optimizer step)
    c.grad_accum = 1  # [int >= 1] microbatches per step (batch_size must divide by it)
    c.steps = 0  # [int >= 0] optimizer steps; 0 means epochs * (train examples // batch_size)
    c.epochs = 1.0  # [float > 0] used when steps == 0
    c.log_every = 10  # [int >= 1] steps between metric rows
    c.eval_every = 0  # [int >= 0] steps between held-out evaluations; 0 = only at start and end
    c.eval_at_start = True  # [bool] evaluate the starting model at step 0 of a fresh run
    c.ckpt_every = 50  # [int >= 1] steps between checkpoints (one is always written at the end)
    c.keep_checkpoints = 2  # [int >= 1] how many checkpoints to keep

    c.mesh = ml_collections.ConfigDict()  # axis sizes; at most one is -1
    c.mesh.data = -1  # [int >= 1 or -1] data-parallel axis size; -1 = the devices left over
    c.mesh.fsdp = 1  # [int >= 1 or -1] params sharded over their largest divisible axis
    c.mesh.tensor = 1  # [int >= 1 or -1] tensor-parallel axis for attention/MLP projections

    c.code_search = ml_collections.ConfigDict()
    c.code_search.query_len = 64  # [int >= 2] query tokens
    c.code_search.code_len = 128  # [int >= 2] code tokens
    c.code_search.temperature = 0.05  # [float > 0] InfoNCE temperature
    c.code_search.holdout = 0.2  # [0 < float < 1] fraction of stdlib modules held out
    c.code_search.max_train = 0  # [int >= 0] cap on training pairs; 0 = all
    c.code_search.max_eval = 0  # [int >= 0] cap on held-out pairs; 0 = all
    c.code_search.eval_batch = 128  # [int >= 1] examples per evaluation forward

    c.planted_rank = ml_collections.ConfigDict()
    c.planted_rank.width = 64  # [int >= 1] width of the teacher/student MLP
    c.planted_rank.layers = 3  # [int >= 1] Dense layers
    c.planted_rank.planted_k = 4  # [int >= 1] rank of the planted update (at most width)
    c.planted_rank.planted_norm = 3.0  # [float > 0] Frobenius norm of each planted ΔW
    c.planted_rank.planted = r"layers_1/kernel"  # [regex] the kernels that get a planted update
    c.planted_rank.eval_examples = 512  # [int >= 1] held-out inputs
    c.planted_rank.train_examples = 4096  # [int >= 1] inputs per epoch (fresh draws; sets the epoch length)

    c.causal_lm = ml_collections.ConfigDict()
    c.causal_lm.source = "stdlib"  # [corpus] pretraining corpus: stdlib | pydoc_topics | an installed package
    c.causal_lm.target = "pydoc_topics"  # [corpus] adaptation corpus (same choices)
    c.causal_lm.train_on = "target"  # [source|target] the corpus batches come from: pretrain or adapt
    c.causal_lm.holdout = 0.1  # [0 < float < 1] fraction of each corpus's documents held out for evaluation
    c.causal_lm.seq_len = 128  # [int >= 2] tokens per window (byte-level: bytes)
    c.causal_lm.eval_windows = 256  # [int >= 1] held-out windows per corpus at each evaluation
    c.causal_lm.eval_batch = 32  # [int >= 1] windows per evaluation forward
    c.causal_lm.hidden_size = 192  # [int >= 1] from-scratch base (model.path ""): width
    c.causal_lm.intermediate_size = 512  # [int >= 1] from-scratch base: SwiGLU width
    c.causal_lm.layers = 4  # [int >= 1] from-scratch base: decoder layers
    c.causal_lm.heads = 3  # [int >= 1] from-scratch base: attention heads (hidden_size / heads is even)
    c.causal_lm.family = "llama"  # [llama|qwen3|gemma3|qwen3_moe] from-scratch base: decoder family
    c.causal_lm.base_dir = ""  # [dir or ""] where pretraining exports; "" = a hashed dir in ~/.cache/lora_jax
    c.causal_lm.base_config = "configs/lm/pretrain.py"  # [config file] named when model.path is missing

    c.jsonl = ml_collections.ConfigDict()  # user data for the jsonl_classification / jsonl_sft tasks
    c.jsonl.train = ""  # [jsonl file] training data, one object a line: {text, label} or {prompt, completion}
    c.jsonl.eval = ""  # [jsonl file] held-out data with the same fields
    c.jsonl.labels = ""  # [labels or ""] classes, comma-separated in id order; "" = the train file's, sorted
    c.jsonl.max_len = 128  # [int >= 2] tokens per example; longer ones are cut (sft: prompt's start first)
    c.jsonl.add_eos = True  # [bool] sft: end each completion with the model's EOS token, so it learns to stop
    c.jsonl.max_train = 0  # [int >= 0] use only the first N training lines; 0 = all
    c.jsonl.max_eval = 0  # [int >= 0] use only the first N held-out lines; 0 = all
    c.jsonl.eval_batch = 64  # [int >= 1] examples per evaluation forward
    return c


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply `:smoke` (tiny and fast on CPU) to any experiment config."""
    if arg in (None, ""):
        return c
    if arg != "smoke":
        raise ValueError(f"unknown config variant {arg!r}; expected 'smoke'")
    c.steps = 20
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, c.steps - 1)  # warm-up ends before the last step
    c.log_every = 5
    c.ckpt_every = 10
    c.code_search.max_train = 20 * c.batch_size
    c.code_search.max_eval = 128
    c.planted_rank.eval_examples = 128
    return c
