"""The transform's invariants on every kind of model: identity at init, merge parity, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax
from lora_jax.adapters import adapter_items


def _setup(name):
    case = zoo.CASES[name]()
    spec = lora_jax.LoraSpec(targets=case.targets, rank=2, alpha=4.0)
    adapters = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    return case, adapters


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_zero_b_is_exactly_the_base(name):
    case, adapters = _setup(name)
    assert all(not np.any(ad.b) for _, ad in adapter_items(adapters))
    out = lora_jax.apply(case.fn, case.params, adapters, *case.args)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(case.fn(case.params, *case.args)))


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_apply_matches_merged_forward(name):
    case, adapters = _setup(name)
    adapters = zoo.randomize(adapters)
    factored = lora_jax.apply(case.fn, case.params, adapters, *case.args)
    merged = case.fn(lora_jax.merge(case.params, adapters), *case.args)
    base = case.fn(case.params, *case.args)
    assert _max_diff(factored, base) > 1e-2  # the adapters really change the output
    np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_grad_matches_materialized(name):
    case, adapters = _setup(name)
    adapters = zoo.randomize(adapters)

    def loss_factored(ad):
        return jnp.sum(jnp.sin(lora_jax.apply(case.fn, case.params, ad, *case.args)))

    def loss_merged(ad):
        return jnp.sum(jnp.sin(case.fn(lora_jax.merge(case.params, ad), *case.args)))

    g_fact = jax.jit(jax.grad(loss_factored))(adapters)
    g_merged = jax.jit(jax.grad(loss_merged))(adapters)
    assert jax.tree.structure(g_fact) == jax.tree.structure(adapters)
    for x, y in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_merged)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_unmerge_inverts_merge(name):
    case, adapters = _setup(name)
    adapters = zoo.randomize(adapters)
    back = lora_jax.unmerge(lora_jax.merge(case.params, adapters), adapters)
    assert _max_diff(back, case.params) <= 1e-6


def _shapes(adapters):
    return {p: (tuple(a.a.shape), tuple(a.b.shape)) for p, a in adapter_items(adapters)}


def test_shapes_follow_how_weights_are_contracted():
    r = 2
    shapes = _shapes(_setup("linen_block")[1])
    assert shapes["params/Attention_0/query/kernel"] == ((8, r), (r, 2, 4))  # [embed]->[heads, dim]
    assert shapes["params/Attention_0/out/kernel"] == ((2, 4, r), (r, 8))  # [heads, dim]->[embed]
    assert shapes["params/mlp_in/kernel"] == ((8, r), (r, 16))
    shapes = _shapes(_setup("scanned")[1])  # stacked on the scanned layer axis
    assert shapes["params/layers/Attention_0/query/kernel"] == ((4, 8, r), (4, r, 2, 4))
    assert shapes["params/layers/mlp_in/kernel"] == ((4, 8, r), (4, r, 16))
    shapes = _shapes(_setup("conv_net")[1])
    assert shapes["params/conv1/kernel"] == ((3, 3, 3, r), (r, 8))
    shapes = _shapes(_setup("tied_embedding")[1])
    assert shapes["params/embed/embedding"] == ((20, r), (r, 8))  # from the gather, not the head


def test_rank_and_alpha_patterns_and_rslora():
    case = zoo.plain_mlp()
    spec = lora_jax.LoraSpec(targets=r"w\d", rank=4, alpha=8.0, scaling="rslora",
                             rank_pattern={"w1": 2, "w2": 1}, alpha_pattern={"w2": 1.0})
    ad = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    assert ad["w0"].rank == 4 and ad["w0"].scale == pytest.approx(8.0 / 2.0)
    assert ad["w1"].rank == 2 and ad["w1"].scale == pytest.approx(8.0 / np.sqrt(2))
    assert ad["w2"].rank == 1 and ad["w2"].scale == pytest.approx(1.0)
    std = lora_jax.LoraSpec(targets=r"w[01]", rank=4, alpha=8.0)
    assert lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=std)[
        "w0"].scale == pytest.approx(2.0)


def test_init_distributions():
    case = zoo.plain_mlp()
    for init, check in (("kaiming", lambda a, fan_in, r: np.abs(a).max() <= 1 / np.sqrt(fan_in)),
                        ("gaussian", lambda a, fan_in, r: abs(a.std() - 1 / r) < 0.3 / r)):
        spec = lora_jax.LoraSpec(targets="w1", rank=4, init=init)
        ad = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)["w1"]
        assert check(np.asarray(ad.a), 12, 4) and not np.any(ad.b)


def test_counts():
    case, adapters = _setup("plain_mlp")
    n = lora_jax.count_params(adapters)
    assert n == 2 * (5 + 12) + 2 * (12 + 12) + 2 * (12 + 2)
    total = lora_jax.count_params(case.params)
    assert lora_jax.trainable_fraction(case.params, adapters) == pytest.approx(n / total)


def test_bf16_unmerge_is_within_one_ulp_of_each_weight():
    case, adapters = _setup("plain_mlp")
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), case.params)
    merged = lora_jax.merge(params, zoo.randomize(adapters))
    back = lora_jax.unmerge(merged, zoo.randomize(adapters))
    for w, m, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged), jax.tree.leaves(back)):
        w32, m32, b32 = (np.asarray(x, np.float32) for x in (w, m, b))
        assert b.dtype == jnp.bfloat16
        # Two roundings, each at most half a bf16 ulp (<= 2^-8 relative): of w + ΔW, then of w.
        bound = 2.0**-8 * (np.abs(m32) + np.abs(w32))
        assert np.all(np.abs(b32 - w32) <= bound)
