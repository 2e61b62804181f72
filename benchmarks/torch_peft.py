"""The same MiniLM step in PyTorch + PEFT: same weights, batch, lengths, rank, targets, loss.

BertModel.from_pretrained(the MiniLM dir) + LoraConfig(r, alpha, ["query", "value"]); mean
pooling, L2 normalisation, InfoNCE at temperature 0.05; torch.optim.AdamW with the same
hyper-parameters and the same global-norm clipping as lora_jax's optimizer.

Equal math: lora_jax's BERT has no dropout, so by default the PEFT model runs its forward in
`eval()` mode (dropout off, gradients still flow); `dropout=True` is PEFT's usual training mode
(BERT's hidden and attention dropout 0.1), a labelled second row, not the comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def available() -> str | None:
    """None if torch, transformers and peft import; otherwise why not."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # any import failure just skips the comparison
        return f"{type(e).__name__}: {e}"
    return None


def _loss(model: Any, batch: dict, temperature: float) -> Any:
    import torch
    import torch.nn.functional as F

    def embed(ids, mask):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    q = embed(batch["query_ids"], batch["query_mask"])
    k = embed(batch["code_ids"], batch["code_mask"])
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, torch.arange(len(q)))


def make_step(model_dir: str, batch: dict[str, np.ndarray], method: str, rank: int = 16,
              alpha: float = 32.0, threads: int = 2, device: str = "cpu",
              dropout: bool = False) -> tuple[Callable, dict]:
    """(step(), info): one optimizer step per call, on `device`, synchronised before returning."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).to(device)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=["query", "value"]))
    model.train(dropout)  # eval mode only switches dropout off here: no batch norm in BERT
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    tb = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, tb, 0.05)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    info = {"method": method, "dropout": dropout, "trainable_params": sum(p.numel() for p in params),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "torch_threads": torch.get_num_threads()}
    return step, info
