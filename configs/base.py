"""Every config field, declared once with its meaning. Experiment configs change only what differs.

Variants go after a colon: `--config=configs/r16.py:smoke` shrinks any config to a run of a
minute or two on CPU (same code path, fewer steps and examples).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds adapter init, dropout and data order
    c.task = "code_search"  # module in lora_jax/tasks: code_search, planted_rank, causal_lm, jsonl_*
    c.method = "lora"  # lora (train adapters only) | full (fine-tune every weight, same loop)
    c.resume = True  # resume from <workdir>/ckpt; False starts over, clearing that workdir's run

    c.model = ml_collections.ConfigDict()
    c.model.path = "sentence-transformers/all-MiniLM-L6-v2"  # HF dir or hub id (task-made models ignore it)
    c.model.dtype = "float32"  # base weights: float32 | bfloat16 (adapters stay float32)
    c.model.scan_layers = False  # one nn.scan over the layers: one compiled layer, stacked weights
    c.model.remat = False  # recompute each layer's activations in the backward pass (memory for time)
    c.model.attention = "xla"  # Llama-family attention kernel: xla | cudnn (NVIDIA GPU, bfloat16)

    c.lora = ml_collections.ConfigDict()
    c.lora.targets = r".*/(query|value)/kernel"  # regex over "/"-joined param paths
    c.lora.rank = 16  # r
    c.lora.alpha = 32.0  # α: the branch is scaled by α/r (or α/√r)
    c.lora.scaling = "standard"  # standard (α/r) | rslora (α/√r)
    c.lora.init = "kaiming"  # A's init: kaiming | gaussian (B starts at 0 either way)
    c.lora.dropout = 0.0  # dropout on the LoRA branch's input while training
    c.lora.train_also = ""  # regex of base weights trained in full beside the adapters (e.g. a new head)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-3  # peak learning rate (of A under LoRA+)
    c.optimizer.warmup_steps = 10  # linear warm-up from 0
    c.optimizer.end_lr_ratio = 0.0  # cosine decays to lr * end_lr_ratio at the last step
    c.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay on matrices (ndim >= 2)
    c.optimizer.clip_norm = 1.0  # global gradient-norm clipping; 0 disables
    c.optimizer.b1 = 0.9  # Adam β1
    c.optimizer.b2 = 0.999  # Adam β2
    c.optimizer.loraplus_ratio = 1.0  # LoRA+: B's learning rate is this multiple of A's

    c.batch_size = 32  # global batch (examples per optimizer step)
    c.grad_accum = 1  # microbatches per step (batch_size must divide by it)
    c.steps = 0  # optimizer steps; 0 means epochs * (train examples // batch_size)
    c.epochs = 1.0  # used when steps == 0
    c.log_every = 10  # steps between metric rows
    c.eval_every = 0  # steps between held-out evaluations; 0 = only at start and end
    c.ckpt_every = 50  # steps between checkpoints (one is always written at the end)
    c.keep_checkpoints = 2  # how many checkpoints to keep

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = the devices left over
    c.mesh.fsdp = 1  # params sharded over their largest divisible axis
    c.mesh.tensor = 1  # tensor-parallel axis for attention/MLP projections

    c.code_search = ml_collections.ConfigDict()
    c.code_search.query_len = 64  # query tokens
    c.code_search.code_len = 128  # code tokens
    c.code_search.temperature = 0.05  # InfoNCE temperature
    c.code_search.holdout = 0.2  # fraction of stdlib modules held out
    c.code_search.max_train = 0  # cap on training pairs; 0 = all
    c.code_search.max_eval = 0  # cap on held-out pairs; 0 = all
    c.code_search.eval_batch = 128  # examples per evaluation forward

    c.planted_rank = ml_collections.ConfigDict()
    c.planted_rank.width = 64  # width of the teacher/student MLP
    c.planted_rank.layers = 3  # Dense layers
    c.planted_rank.planted_k = 4  # rank of the planted update
    c.planted_rank.planted_norm = 3.0  # Frobenius norm of each planted ΔW
    c.planted_rank.planted = r"layers_1/kernel"  # regex of the weights that get a planted update
    c.planted_rank.eval_examples = 512  # held-out inputs
    c.planted_rank.train_examples = 4096  # inputs per epoch (fresh draws; only sets the epoch length)

    c.causal_lm = ml_collections.ConfigDict()
    c.causal_lm.source = "stdlib"  # pretraining corpus: stdlib | pydoc_topics | an installed package's name
    c.causal_lm.target = "pydoc_topics"  # adaptation corpus (same choices)
    c.causal_lm.train_on = "target"  # which corpus batches come from: source (pretrain) | target (adapt)
    c.causal_lm.holdout = 0.1  # fraction of each corpus's documents held out for evaluation
    c.causal_lm.seq_len = 128  # tokens per window (byte-level: bytes)
    c.causal_lm.eval_windows = 256  # held-out windows per corpus at each evaluation
    c.causal_lm.eval_batch = 32  # windows per evaluation forward
    c.causal_lm.hidden_size = 192  # from-scratch base (model.path ""): width
    c.causal_lm.intermediate_size = 512  # from-scratch base: SwiGLU width
    c.causal_lm.layers = 4  # from-scratch base: decoder layers
    c.causal_lm.heads = 3  # from-scratch base: attention heads (head_dim = hidden_size / heads)
    c.causal_lm.base_dir = ""  # where pretraining exports the base; "" = a hashed dir in ~/.cache/lora_jax
    c.causal_lm.base_config = "configs/lm/pretrain.py"  # pretrain config named when model.path is missing

    c.jsonl = ml_collections.ConfigDict()  # user data for the jsonl_classification / jsonl_sft tasks
    c.jsonl.train = ""  # training .jsonl, one object per line: {text, label} or {prompt, completion}
    c.jsonl.eval = ""  # held-out .jsonl with the same fields
    c.jsonl.labels = ""  # classification: comma-separated labels in class-id order; "" = train file's, sorted
    c.jsonl.max_len = 128  # tokens per example; longer ones are cut (sft: the prompt's start first)
    c.jsonl.add_eos = True  # sft: end each completion with the model's EOS token, so it learns to stop
    c.jsonl.max_train = 0  # use only the first N training lines; 0 = all
    c.jsonl.max_eval = 0  # use only the first N held-out lines; 0 = all
    c.jsonl.eval_batch = 64  # examples per evaluation forward
    return c


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply `:smoke` (tiny and fast on CPU) to any experiment config."""
    if arg in (None, ""):
        return c
    if arg != "smoke":
        raise ValueError(f"unknown config variant {arg!r}; expected 'smoke'")
    c.steps = 20
    c.log_every = 5
    c.ckpt_every = 10
    c.code_search.max_train = 20 * c.batch_size
    c.code_search.max_eval = 128
    c.planted_rank.eval_examples = 128
    return c
