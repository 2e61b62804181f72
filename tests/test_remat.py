"""Remat policies (lora_jax/models/remat.py): same gradients, less memory in the promised order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import models as M
from lora_jax.errors import LoraError
from lora_jax.models.remat import POLICIES, policy_name

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=256,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             rms_norm_eps=1e-5, max_position_embeddings=256, hidden_act="silu")
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 64)), jnp.int32)
MASK = jnp.ones_like(IDS)


def _grads_and_temp_bytes(policy: str):
    """Adapter gradients of a scanned Llama under `policy` and the compiled step's temp memory."""
    m = M.from_config(LLAMA, seed=0, scan_layers=True, remat=policy)
    spec = lora_jax.LoraSpec(targets=r".*(q_proj|v_proj|up_proj|down_proj)/kernel", rank=4, alpha=8.0)
    adapters = lora_jax.init(jax.random.key(1), m.fn, m.params, IDS, MASK, spec=spec)
    # B != 0 so that A's gradient is not zero and the comparison means something
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)

    def loss(a):
        return jnp.mean(jnp.sin(lora_jax.apply(m.fn, m.params, a, IDS, MASK)))

    grad = jax.jit(jax.grad(loss))
    temp = grad.lower(adapters).compile().memory_analysis().temp_size_in_bytes
    return grad(adapters), temp


def test_policies_give_the_same_gradients_and_order_the_memory():
    results = {p: _grads_and_temp_bytes(p) for p in POLICIES}
    want = jax.tree.leaves(results["none"][0])
    assert max(float(jnp.abs(g).max()) for g in want) > 0
    for p in POLICIES[1:]:
        for g, w in zip(jax.tree.leaves(results[p][0]), want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=p)
    temp = {p: t for p, (_, t) in results.items()}
    # full keeps the least; keeping the attention's tensors costs more, every matmul output more
    # still, and keeping everything the most
    assert temp["full"] < temp["save_dots_except_mlp"] < temp["save_dots"] < temp["none"], temp


def test_policy_names():
    assert policy_name(True) == "full" and policy_name(False) == "none"
    assert M.from_config(LLAMA, remat=True).config.remat == "full"
    with pytest.raises(LoraError, match="remat 'dots' is not one of"):
        M.from_config(LLAMA, remat="dots")
