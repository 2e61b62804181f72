"""PiSSA/OLoRA in the main job (lora.init=pissa|pissa_niter_K|olora).

- Frozen base: the residual W − s·A₀·B₀ (`lora_jax.residual_base`), built once on the base's own
  shardings; the user's (the task's) params are never changed.
- Checkpoints: beside the trainable tree each one holds "initial", the factors A₀, B₀ (adapter
  sized, never a base-sized file). Resume rebuilds the residual from the original base and them.
- What leaves the run (adapter/, peft/, evaluation's trainable tree, the result) is the plain
  rank-2r LoRA on the ORIGINAL base (`lora_jax.to_plain_lora`), so everything that reads a run
  (export, merge, PEFT, vLLM) needs no special case.
"""

from __future__ import annotations

import re
from typing import Any

import jax

import lora_jax
from lora_jax import sharding as shd
from lora_jax.adapters import adapter_items
from lora_jax.errors import LoraError
from lora_jax.spec import changes_base

PyTree = Any


def initial_factors(lora_cfg: Any, adapters: PyTree, param_sh: PyTree) -> PyTree | None:
    """A₀, B₀ in their own buffers (the train state is donated), placed as the adapters are;
    None unless lora.init starts from W."""
    if not changes_base(lora_cfg.init):
        return None
    both = [p for p, _ in adapter_items(adapters)
            if lora_cfg.train_also and re.fullmatch(lora_cfg.train_also, p)]
    if both:
        raise LoraError(f"lora.train_also {lora_cfg.train_also!r} matches '{both[0]}', which "
                        f"lora.init={lora_cfg.init!r} also adapts from its residual; train it in "
                        "full or adapt it, not both")
    host = jax.tree.map(shd.to_host, adapters)
    return shd.place(host, lora_jax.adapter_shardings(adapters, param_sh))


def base_for(params: PyTree, initial: PyTree | None, param_sh: PyTree) -> PyTree:
    """The frozen base the adapters train on: `params`, or their residual under PiSSA/OLoRA."""
    if initial is None:
        return params
    return jax.jit(lora_jax.residual_base, out_shardings=param_sh)(params, initial)


def kept(initial: PyTree | None) -> dict:
    """The checkpoint's extra entry: {"initial": A₀, B₀}, or nothing."""
    return {} if initial is None else {"initial": initial}


def exported(trainable: PyTree, initial: PyTree | None) -> PyTree:
    """The trainable tree with its adapters relative to the original base (rank 2r under PiSSA/OLoRA)."""
    if initial is None:
        return trainable
    return {**trainable, "adapters": lora_jax.to_plain_lora(trainable["adapters"], initial)}
