"""Pretrain the `causal_lm` base from scratch and export it as an HF directory, once per config.

    pretrain(config, workdir=None) -> the base directory (config.json, model.safetensors,
    tokenizer.json, pretrain.json)

It is the trainer's "full" run on the source corpus from a random init; the final params are
written with `save_pretrained`. The directory is named by a hash of everything that decides the
weights (base_dir below), so adaptation configs can point at it and a second call reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any

FORMAT = 1  # bump when the data or model code changes what a given config produces
# Fields that decide the pretrained weights; logging, evaluation and the mesh do not.
_WEIGHT_FIELDS = ("seed", "batch_size", "grad_accum", "steps", "epochs", "optimizer", "model.dtype",
                  "causal_lm.source", "causal_lm.holdout", "causal_lm.seq_len",
                  "causal_lm.hidden_size", "causal_lm.intermediate_size", "causal_lm.layers",
                  "causal_lm.heads")


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


def base_dir(config: Any) -> str:
    """Where the base of this pretrain config lives: causal_lm.base_dir, or a hashed cache dir."""
    if config.causal_lm.base_dir:
        return os.path.expanduser(config.causal_lm.base_dir)
    key = {f: _get(config, f) for f in _WEIGHT_FIELDS}
    if config.model.scan_layers:  # stacked layers draw their init differently (kept out otherwise,
        key["model.scan_layers"] = True  # so bases made before the field existed keep their name)
    if config.causal_lm.family != "llama":  # likewise: Llama bases keep their name
        key["causal_lm.family"] = config.causal_lm.family
    key.update(format=FORMAT, python=list(sys.version_info[:2]))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = os.environ.get("LORA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_jax")
    return os.path.join(root, f"causal_lm_base-{digest}")


def is_complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f))
               for f in ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json"))


def check_pretrain_config(config: Any) -> None:
    """Pretraining is a full run on the source corpus from a random init; refuse anything else."""
    from lora_jax.errors import LoraError

    expected = {"task": "causal_lm", "method": "full", "model.path": "", "causal_lm.train_on": "source"}
    wrong = {k: _get(config, k) for k, v in expected.items() if _get(config, k) != v}
    if wrong:
        raise LoraError(f"a pretrain config needs {expected}; got {wrong}")


def pretrain(config: Any, workdir: str | None = None) -> str:
    """Train (resuming in workdir, default <base_dir>.run) unless the base exists; export; return it."""
    import jax

    from lora_jax.models import from_config, save_pretrained
    from lora_jax.sharding import to_host
    from lora_jax.tasks.causal_lm import hf_config
    from lora_jax.tasks.corpora import byte_tokenizer
    from lora_jax.tasks.task import model_options
    from lora_jax.trainer import train_and_evaluate

    check_pretrain_config(config)
    out = base_dir(config)
    if is_complete(out):
        return out
    workdir = workdir or out + ".run"
    t0 = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - t0
    params = jax.tree.map(to_host, result["trainable"])  # every process joins the gather
    if jax.process_index() != 0:
        return out
    # Write beside the target and rename, so a reader never sees half a base.
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = from_config(hf_config(config.causal_lm), seed=config.seed, **model_options(config))
    save_pretrained(model, params, tmp)  # scanned stacks are split back into HF's per-layer names
    byte_tokenizer().save(os.path.join(tmp, "tokenizer.json"))
    info = {"config": json.loads(config.to_json()), "eval": result["eval"], "steps": result["steps"],
            "train_seconds_this_call": seconds, "workdir": os.path.abspath(workdir)}
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
