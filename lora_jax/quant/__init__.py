"""Frozen weights quantised exactly as bitsandbytes quantises them (QLoRA's NF4, FP4, LLM.int8).

q = quantize(kernel, "nf4", transpose=True)   # a Flax [in, out] kernel, blocked as bnb's [out, in]
w = dequantize(q)                             # [in, out] again, in the kernel's dtype
params_q = quantize_params(params, r".*/(query|value)/kernel", "nf4", transpose=True)
"""

from lora_jax.quant.tree import dequantize_params, quantize_params
from lora_jax.quant.weight import BLOCKSIZES, KINDS, QuantizedWeight, dequantize, is_quantized, quantize

__all__ = [
    "BLOCKSIZES",
    "KINDS",
    "QuantizedWeight",
    "dequantize",
    "dequantize_params",
    "is_quantized",
    "quantize",
    "quantize_params",
]
