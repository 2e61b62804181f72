"""A frozen random MLP learns XOR through LoRA alone, and its weights stay bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax


def mlp(params, x_Nx2):
    h = jnp.tanh(x_Nx2 @ params["hidden"]["kernel"] + params["hidden"]["bias"][None, :])
    return (h @ params["out"]["kernel"])[:, 0]


def test_frozen_mlp_learns_xor_through_lora():
    x = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.float32)
    y = jnp.array([0.0, 1.0, 1.0, 0.0])
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "hidden": {"kernel": jax.random.normal(k1, (2, 16)), "bias": jax.random.normal(k3, (16,))},
        "out": {"kernel": jax.random.normal(k2, (16, 1)) / 4},
    }
    before = jax.tree.map(np.array, params)
    spec = lora_jax.LoraSpec(targets=r".*/kernel", rank=2, alpha=2.0, rank_pattern={"out/kernel": 1})
    adapters = lora_jax.init(jax.random.key(1), mlp, params, x, spec=spec)
    tx = optax.adam(0.05)
    opt = tx.init(adapters)

    def loss_fn(ad):
        logits = lora_jax.apply(mlp, params, ad, x)
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    @jax.jit
    def step(ad, opt):
        loss, g = jax.value_and_grad(loss_fn)(ad)
        updates, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, updates), opt, loss

    base_loss = float(loss_fn(adapters))
    for _ in range(200):
        adapters, opt, loss = step(adapters, opt)
    assert base_loss > 0.5
    assert float(loss) < 0.05
    pred = lora_jax.apply(mlp, params, adapters, x) > 0
    np.testing.assert_array_equal(np.asarray(pred), np.asarray(y, bool))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
