"""The transform under JAX's transformations: jit, remat, casts, sharding, loops, custom rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lora_jax


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (6, 8)) / 3, "w2": jax.random.normal(k2, (8, 4)) / 3}


X = jax.random.normal(jax.random.key(5), (5, 6))


def _check_parity(fn, targets=r"w\d", atol=1e-5, **init_kw):
    params = _params()
    spec = lora_jax.LoraSpec(targets=targets, rank=2, alpha=2.0)
    adapters = zoo.randomize(lora_jax.init(jax.random.key(1), fn, params, X, spec=spec, **init_kw))
    factored = jax.jit(lambda a: lora_jax.apply(fn, params, a, X, **init_kw))(adapters)
    merged = fn(lora_jax.merge(params, adapters), X)
    assert float(jnp.max(jnp.abs(merged - fn(params, X)))) > 1e-2
    np.testing.assert_allclose(np.asarray(factored, np.float32), np.asarray(merged, np.float32),
                               atol=atol, rtol=atol)
    return params, adapters


def test_nested_jit_and_remat():
    @jax.jit
    def layer(w, x):
        return jnp.tanh(x @ w)

    def fn(p, x):
        x = jax.checkpoint(layer)(p["w1"], x)
        return jax.jit(lambda w, x: x @ w)(p["w2"], x)

    _check_parity(fn)


def test_bf16_weight_casts():
    def fn(p, x):
        h = jnp.tanh(x.astype(jnp.bfloat16) @ p["w1"].astype(jnp.bfloat16))
        return (h @ p["w2"].astype(jnp.bfloat16)).astype(jnp.float32)

    params, adapters = _check_parity(fn, atol=5e-2)
    grads = jax.grad(lambda a: lora_jax.apply(fn, params, a, X).sum())(adapters)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # adapters stay fp32


def test_with_sharding_constraint_on_8_devices():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))

    def fn(p, x):
        w1 = jax.lax.with_sharding_constraint(p["w1"], NamedSharding(mesh, PartitionSpec(None, "model")))
        return jnp.tanh(x @ w1) @ p["w2"]

    _check_parity(fn)


def test_weight_transposed_and_einsum_on_left():
    def fn(p, x):
        h = jnp.einsum("io,bi->bo", p["w1"], x)  # W on the left of dot_general
        return (p["w2"].T @ jnp.tanh(h).T).T

    _check_parity(fn)


def test_fori_loop_cond_and_custom_vjp():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    def fn(p, x):
        h = jnp.tanh(matmul(x, p["w1"]))
        h = jax.lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ p["w2"] @ p["w2"].T), h)
        return jax.lax.cond(h.sum() > -1e9, lambda: h @ p["w2"], lambda: -(h @ p["w2"]))

    _check_parity(fn)


def test_materializing_only_when_asked():
    def fn(p, x):
        return jnp.tanh(x @ (2.0 * p["w1"])) @ p["w2"]

    params = _params()
    spec = lora_jax.LoraSpec(targets=r"w\d", rank=2)
    with pytest.raises(lora_jax.LoraError, match=r"'w1' reaches 'mul'.*allow_materialize=True"):
        lora_jax.init(jax.random.key(0), fn, params, X, spec=spec)
    _check_parity(fn, allow_materialize=True)


def test_dropout_only_when_training():
    case = zoo.plain_mlp()
    spec = lora_jax.LoraSpec(targets=r"w\d", rank=2, dropout=0.5)
    ad = zoo.randomize(lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec))
    run = functools.partial(lora_jax.apply, case.fn, case.params, ad, *case.args)
    clean = run()
    np.testing.assert_array_equal(run(rng=jax.random.key(1)), clean)  # deterministic by default
    drop1 = run(rng=jax.random.key(1), deterministic=False)
    assert float(jnp.max(jnp.abs(drop1 - clean))) > 1e-3
    np.testing.assert_array_equal(drop1, run(rng=jax.random.key(1), deterministic=False))
    assert float(jnp.max(jnp.abs(drop1 - run(rng=jax.random.key(2), deterministic=False)))) > 1e-3


def test_dropout_masks_differ_across_scanned_layers():
    case = zoo.scanned()
    spec = lora_jax.LoraSpec(targets=case.targets, rank=2, dropout=0.5)
    ad = zoo.randomize(lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec))
    out = jax.jit(lambda a, k: lora_jax.apply(case.fn, case.params, a, *case.args, rng=k,
                                              deterministic=False))(ad, jax.random.key(3))
    assert out.shape == case.args[0].shape and bool(jnp.all(jnp.isfinite(out)))


def test_adapter_shardings_follow_the_base():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    case = zoo.scanned()
    spec = lora_jax.LoraSpec(targets=r".*/(query|out)/kernel", rank=2)
    ad = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    P = PartitionSpec

    def rule(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("query/kernel"):  # [layer, embed, heads, dim]
            return NamedSharding(mesh, P(None, "fsdp", "tensor", None))
        if name.endswith("out/kernel"):  # [layer, heads, dim, embed]
            return NamedSharding(mesh, P(None, "tensor", None, "fsdp"))
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(rule, case.params)
    ad_sh = lora_jax.adapter_shardings(ad, shardings)
    q = ad_sh["params"]["layers"]["Attention_0"]["query"]["kernel"]
    o = ad_sh["params"]["layers"]["Attention_0"]["out"]["kernel"]
    assert q.a.spec == P(None, "fsdp", None) and q.b.spec == P(None, None, "tensor", None)
    assert o.a.spec == P(None, "tensor", None, None) and o.b.spec == P(None, None, "fsdp")
    placed = jax.device_put(ad, ad_sh)
    out = jax.jit(lambda a: lora_jax.apply(case.fn, case.params, a, *case.args))(placed)
    np.testing.assert_allclose(out, case.fn(case.params, *case.args), atol=1e-5, rtol=1e-5)
