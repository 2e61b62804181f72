"""lora_jax: LoRA as a pure-functional transform over JAX parameter trees."""

from lora_jax.adapters import Adapter as Adapter
from lora_jax.adapters import adapter_shardings as adapter_shardings
from lora_jax.adapters import count_params as count_params
from lora_jax.adapters import merge as merge
from lora_jax.adapters import trainable_fraction as trainable_fraction
from lora_jax.adapters import unmerge as unmerge
from lora_jax.errors import LoraError as LoraError
from lora_jax.multi import stack_adapters as stack_adapters
from lora_jax.spec import LoraSpec as LoraSpec
from lora_jax.transform import apply as apply
from lora_jax.transform import init as init

__all__ = [
    "Adapter",
    "LoraError",
    "LoraSpec",
    "adapter_shardings",
    "apply",
    "count_params",
    "init",
    "merge",
    "stack_adapters",
    "trainable_fraction",
    "unmerge",
]
