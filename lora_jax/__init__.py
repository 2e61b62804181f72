"""lora_jax: LoRA as a pure-functional transform over JAX parameter trees.

The transform is imported eagerly; the heavier layers (models, PEFT interop, combine, analysis,
the adapter library, generation) load on first use, so `import lora_jax` then
`lora_jax.peft.save_adapter(...)` works without importing them all up front.
"""

import importlib as _importlib

from lora_jax.adapters import Adapter as Adapter
from lora_jax.adapters import adapter_shardings as adapter_shardings
from lora_jax.adapters import count_params as count_params
from lora_jax.adapters import merge as merge
from lora_jax.adapters import trainable_fraction as trainable_fraction
from lora_jax.adapters import unmerge as unmerge
from lora_jax.describe import describe as describe
from lora_jax.errors import LoraError as LoraError
from lora_jax.multi import stack_adapters as stack_adapters
from lora_jax.spec import LoraSpec as LoraSpec
from lora_jax.transform import apply as apply
from lora_jax.transform import init as init
from lora_jax.variants.convert import to_plain_lora as to_plain_lora
from lora_jax.variants.pissa import residual_base as residual_base

__all__ = [
    "Adapter",
    "LoraError",
    "LoraSpec",
    "adapter_shardings",
    "apply",
    "count_params",
    "describe",
    "init",
    "merge",
    "residual_base",
    "stack_adapters",
    "to_plain_lora",
    "trainable_fraction",
    "unmerge",
]

_SUBMODULES = ("adapter_io", "analysis", "combine", "generate", "library", "models", "peft")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"lora_jax.{name}")
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")
