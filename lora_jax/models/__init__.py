"""Flax Llama-family decoders and BERT-style encoders, loaded from / exported to HF safetensors.

    model = lora_jax.models.load("sentence-transformers/all-MiniLM-L6-v2")
    hidden_BxTxD = model.fn(model.params, input_ids, attention_mask)
"""

from lora_jax.models.bert import BertConfig, BertModel, ClassificationHead, mean_pool
from lora_jax.models.export import hf_state_dict, save_pretrained
from lora_jax.models.hf_names import flax_to_hf, hf_to_flax, is_stacked, stack_path, unstack_path
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from lora_jax.models.loading import LoadedModel, build_module, family_of, from_config, load

# PEFT's default LoRA targets per family, as regexes over params paths (scanned or not).
DEFAULT_TARGETS = {"llama": r".*/(q_proj|v_proj)/kernel", "bert": r".*/(query|value)/kernel"}

__all__ = [
    "DEFAULT_TARGETS",
    "BertConfig",
    "BertModel",
    "ClassificationHead",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoadedModel",
    "build_module",
    "family_of",
    "flax_to_hf",
    "from_config",
    "hf_state_dict",
    "hf_to_flax",
    "is_stacked",
    "load",
    "mean_pool",
    "save_pretrained",
    "stack_path",
    "unstack_path",
]
