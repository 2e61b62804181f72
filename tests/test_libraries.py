"""LoRA on models written as haiku, equinox, flax nnx and penzai users write them.

Each library's dense, attention, conv and stacked-layer modules get the transform's four
invariants; flax's own LoRA layers and qwix's LoRA are the peers for numerical parity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax
from lora_jax.adapters import adapter_items

X_BxD = jax.random.normal(jax.random.key(1), (2, 8))
SEQ_BxTxD = jax.random.normal(jax.random.key(2), (2, 5, 8))
IMG_BxHxWxC = jax.random.normal(jax.random.key(3), (2, 7, 7, 3))
IDS_BxT = jnp.arange(10).reshape(2, 5) * 3 % 20


# ---------------------------------------------------------------- haiku


def _haiku(body, x, targets):
    hk = pytest.importorskip("haiku")
    f = hk.without_apply_rng(hk.transform(lambda x: body(hk, x)))
    return zoo.Case(f.apply, f.init(jax.random.key(0), x), (x,), targets)


def _haiku_stack(hk, ids):
    def block(x):
        return x + hk.Linear(8, name="fc2")(jax.nn.gelu(hk.Linear(16, name="fc1")(x)))

    x = hk.Embed(20, 8, name="embed")(ids)
    return hk.Linear(4, name="head")(hk.layer_stack(3)(block)(x))


def _haiku_conv(hk, x):
    x = jax.nn.relu(hk.Conv2D(8, 3, name="conv1")(x))
    x = jax.nn.relu(hk.Conv2D(8, 3, stride=2, name="conv2")(x))
    return hk.Linear(4, name="head")(x.mean(axis=(1, 2)))


HAIKU = {
    "haiku/dense": lambda: _haiku(lambda hk, x: hk.nets.MLP([16, 3])(x), X_BxD, r".*/w"),
    "haiku/attention": lambda: _haiku(
        lambda hk, x: hk.MultiHeadAttention(2, 4, w_init=hk.initializers.VarianceScaling(1.0))(x, x, x),
        SEQ_BxTxD, r".*/w"),
    "haiku/conv": lambda: _haiku(_haiku_conv, IMG_BxHxWxC, r".*/w"),
    "haiku/stacked": lambda: _haiku(_haiku_stack, IDS_BxT, r".*/(w|embeddings)"),
}


# ---------------------------------------------------------------- equinox


def _eqx(make, call, x, targets):
    """fn closes over the module's non-array leaves; params are its arrays (eqx.partition)."""
    eqx = pytest.importorskip("equinox")
    params, static = eqx.partition(make(eqx, jax.random.key(0)), eqx.is_array)
    return zoo.Case(lambda p, x: call(eqx.combine(p, static), x), params, (x,), targets)


def _eqx_stack(eqx, key):
    class Block(eqx.Module):
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.fc1, self.fc2 = eqx.nn.Linear(8, 16, key=k1), eqx.nn.Linear(16, 8, key=k2)

        def __call__(self, x):
            return x + self.fc2(jax.nn.gelu(self.fc1(x)))

    class Model(eqx.Module):
        embed: eqx.nn.Embedding
        blocks: Block
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.embed = eqx.nn.Embedding(20, 8, key=k1)
            self.blocks = eqx.filter_vmap(Block)(jax.random.split(k2, 3))
            self.head = eqx.nn.Linear(8, 4, key=k3)

        def __call__(self, ids_T):
            x = jax.vmap(self.embed)(ids_T)
            arrays, static = eqx.partition(self.blocks, eqx.is_array)
            x, _ = jax.lax.scan(lambda x, b: (jax.vmap(eqx.combine(b, static))(x), None), x, arrays)
            return jax.vmap(self.head)(x)

    return Model(key)


def _eqx_conv(eqx, key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential([eqx.nn.Conv2d(3, 8, 3, key=k1), eqx.nn.Lambda(jax.nn.relu),
                              eqx.nn.Lambda(lambda x: x.mean(axis=(1, 2))),
                              eqx.nn.Linear(8, 4, key=k2)])


EQUINOX = {
    "equinox/dense": lambda: _eqx(lambda eqx, k: eqx.nn.MLP(8, 3, 16, 2, key=k),
                                  lambda m, x: jax.vmap(m)(x), X_BxD, r".*weight"),
    "equinox/attention": lambda: _eqx(lambda eqx, k: eqx.nn.MultiheadAttention(2, 8, key=k),
                                      lambda m, x: jax.vmap(lambda s: m(s, s, s))(x), SEQ_BxTxD,
                                      r".*weight"),
    "equinox/conv": lambda: _eqx(_eqx_conv, lambda m, x: jax.vmap(m)(jnp.moveaxis(x, -1, 1)),
                                 IMG_BxHxWxC, r".*weight"),
    "equinox/stacked": lambda: _eqx(_eqx_stack, lambda m, ids: jax.vmap(m)(ids), IDS_BxT,
                                    r".*weight"),
}


# ---------------------------------------------------------------- flax nnx


def _nnx(make, x, targets):
    from flax import nnx

    graphdef, state = nnx.split(make(nnx, nnx.Rngs(0)))
    return zoo.Case(lambda s, x: nnx.merge(graphdef, s)(x), state, (x,), targets)


def _nnx_dense(nnx, rngs):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    return MLP(rngs)


def _nnx_block(nnx):
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, x):
            return x + self.fc2(jax.nn.gelu(self.fc1(x)))

    return Block


def _nnx_remat(nnx, rngs):
    """nnx.remat hands the module's weights back out of the remat unchanged."""
    block = _nnx_block(nnx)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(20, 8, rngs=rngs)
            self.b1, self.b2 = block(rngs), block(rngs)

        def __call__(self, ids):
            x = self.embed(ids)
            x = nnx.remat(lambda m, x: m(x))(self.b1, x)
            return nnx.remat(lambda m, x: m(x))(self.b2, x)

    return Model(rngs)


def _nnx_stack(nnx, rngs):
    block = _nnx_block(nnx)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(20, 8, rngs=rngs)
            self.blocks = nnx.split_rngs(splits=3)(nnx.vmap(block, in_axes=(0,), out_axes=0))(rngs)

        def __call__(self, ids):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            @nnx.remat
            def step(x, layer):
                return layer(x)

            return step(self.embed(ids), self.blocks)

    return Model(rngs)


def _nnx_conv(nnx, rngs):
    class ConvNet(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
            self.head = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
            return self.head(x.mean(axis=(1, 2)))

    return ConvNet(rngs)


NNX = {
    "nnx/dense": lambda: _nnx(_nnx_dense, X_BxD, r".*kernel"),
    "nnx/attention": lambda: _nnx(
        lambda nnx, rngs: nnx.MultiHeadAttention(2, 8, 8, decode=False, rngs=rngs),
        SEQ_BxTxD, r".*kernel"),
    "nnx/conv": lambda: _nnx(_nnx_conv, IMG_BxHxWxC, r".*kernel"),
    "nnx/remat": lambda: _nnx(_nnx_remat, IDS_BxT, r".*(kernel|embedding)"),
    "nnx/stacked": lambda: _nnx(_nnx_stack, IDS_BxT, r".*(kernel|embedding)"),
}


# ---------------------------------------------------------------- penzai


def _penzai(model, x, axes_in, axes_out, targets):
    """Params are the model's ParameterValues keyed by label; fn binds them back."""
    pz = pytest.importorskip("penzai.pz")
    unbound, values = pz.unbind_params(model, freeze=True)
    params = {v.label: v for v in values}

    def fn(p, x):
        return pz.bind_variables(unbound, list(p.values()))(pz.nx.wrap(x).tag(*axes_in)).unwrap(*axes_out)

    return zoo.Case(fn, params, (x,), targets)


def _penzai_lm(layer_stack: bool):
    """A llama-like LM: embedding, attention, gated MLP and head; 2 blocks when stacked."""
    pytest.importorskip("penzai")
    from penzai.models.transformer.variants import llamalike_common as ll

    cfg = ll.LlamalikeTransformerConfig(
        num_kv_heads=2, query_head_multiplier=1, embedding_dim=8, projection_dim=4, mlp_hidden_dim=16,
        num_decoder_blocks=1 + layer_stack, vocab_size=20, mlp_variant="swiglu",
        tie_embedder_and_logits=False, use_layer_stack=layer_stack)
    lm = ll.build_llamalike_transformer(cfg, init_base_rng=jax.random.key(0))
    return _penzai(lm, IDS_BxT, ("batch", "seq"), ("batch", "seq", "vocabulary"),
                   r".*/(attention|mlp)/.*weights|.*(embeddings|lm_head\.weights)")


def _penzai_dense():
    pytest.importorskip("penzai")
    from penzai.models import simple_mlp

    mlp = simple_mlp.MLP.from_config(jax.random.key(0), [8, 16, 3])
    return _penzai(mlp, X_BxD, ("batch", "features"), ("batch", "features"), r".*weights")


def _penzai_conv():
    """Penzai has no conv layer: a user's own Layer holding a Parameter, as its docs suggest."""
    pz = pytest.importorskip("penzai.pz")

    @pz.pytree_dataclass
    class Conv(pz.nn.Layer):
        kernel: pz.nn.ParameterLike

        def __call__(self, x, **_):
            y = jax.lax.conv_general_dilated(x.unwrap("b", "h", "w", "c"), self.kernel.value, (1, 1),
                                             "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return pz.nx.wrap(y.mean(axis=(1, 2))).tag("b", "features")

    k = jax.random.normal(jax.random.key(0), (3, 3, 3, 8)) / 5
    model = pz.nn.Sequential([
        Conv(pz.Parameter(value=k, label="conv.kernel")), pz.nn.Elementwise(jax.nn.relu),
        pz.nn.Linear.from_config(name="head", init_base_rng=jax.random.key(1),
                                 input_axes={"features": 8}, output_axes={"out": 4}),
    ])
    return _penzai(model, IMG_BxHxWxC, ("b", "h", "w", "c"), ("b", "out"), r".*(kernel|weights)")


PENZAI = {
    "penzai/dense": _penzai_dense,
    "penzai/attention": lambda: _penzai_lm(layer_stack=False),
    "penzai/conv": _penzai_conv,
    "penzai/stacked": lambda: _penzai_lm(layer_stack=True),
}

CASES = {**HAIKU, **EQUINOX, **NNX, **PENZAI}


# ---------------------------------------------------------------- the invariants


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                              strict=True))


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_model_invariants(name):
    case = CASES[name]()
    spec = lora_jax.LoraSpec(targets=case.targets, rank=2, alpha=4.0)
    adapters = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    assert len(adapter_items(adapters)) >= 2
    base = case.fn(case.params, *case.args)  # eager: XLA may fuse a jitted base+0 differently
    at_init = lora_jax.apply(case.fn, case.params, adapters, *case.args)
    np.testing.assert_array_equal(np.asarray(at_init), np.asarray(base))  # B = 0: the base

    def loss(f):  # a non-linear read-out, so the gradients see every output
        return jax.jit(jax.value_and_grad(lambda a: (jnp.sum(jnp.sin(f(a))), f(a)), has_aux=True))

    adapters = zoo.randomize(adapters)
    (_, factored), g_fact = loss(lambda a: lora_jax.apply(case.fn, case.params, a, *case.args))(adapters)
    (_, merged), g_merged = loss(lambda a: case.fn(lora_jax.merge(case.params, a), *case.args))(adapters)
    assert _max_diff(factored, base) > 1e-2  # the adapters really change the output
    np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), atol=1e-5, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_merged), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=1e-4)

    back = lora_jax.unmerge(lora_jax.merge(case.params, adapters), adapters)
    assert _max_diff(back, case.params) <= 1e-6


# ---------------------------------------------------------------- regressions, as users write them


def test_equinox_embedding_under_vmap_and_alone():
    """vmap(Embedding) gathers with both axes in start_index_map; a scalar id is a dynamic_slice.
    Neither may count the embedding axis as indexed."""
    eqx = pytest.importorskip("equinox")
    params = {"embed": eqx.nn.Embedding(800, 16, key=jax.random.key(0))}
    spec = lora_jax.LoraSpec(targets=r"embed/weight", rank=4)
    ids = jnp.array([3, 799, 0])
    for fn, args in ((lambda p, ids: jax.vmap(p["embed"])(ids), (ids,)),
                     (lambda p, i: p["embed"](i), (ids[1],))):
        ad = lora_jax.init(jax.random.key(0), fn, params, *args, spec=spec)["embed"]["weight"]
        assert (ad.a.shape, ad.b.shape) == ((800, 4), (4, 16))
        ad = zoo.randomize({"embed": {"weight": ad}})
        np.testing.assert_allclose(lora_jax.apply(fn, params, ad, *args),
                                   fn(lora_jax.merge(params, ad), *args), atol=1e-5, rtol=1e-5)


def test_nnx_remat_weights_pass_through():
    case = NNX["nnx/remat"]()
    spec = lora_jax.LoraSpec(targets=r"b\d/fc\d/kernel", rank=2)
    ad = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    assert ad["b1"]["fc1"]["kernel"].a.shape == (8, 2)


# ---------------------------------------------------------------- peers: flax's LoRA and qwix


def _nnx_mlp_with_adapters(rank):
    from flax import nnx

    case = _nnx(_nnx_dense, X_BxD, r"fc\d/kernel")
    spec = lora_jax.LoraSpec(targets=case.targets, rank=rank, alpha=float(rank))  # scale 1
    ad = zoo.randomize(lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec))
    return nnx, case, ad


def test_matches_flax_lora_linear():
    """flax's nnx.LoRALinear adds x·A·B unscaled: lora_jax at alpha = rank is the same layer."""
    nnx, case, ad = _nnx_mlp_with_adapters(rank=3)
    rngs = nnx.Rngs(0)
    layers = {}
    for name, (n_in, n_out) in {"fc1": (8, 16), "fc2": (16, 3)}.items():
        layer = nnx.LoRALinear(n_in, n_out, lora_rank=3, rngs=rngs)
        layer.kernel[...] = case.params[name]["kernel"][...]
        layer.bias[...] = case.params[name]["bias"][...]
        layer.lora.lora_a[...] = ad[name]["kernel"].a
        layer.lora.lora_b[...] = ad[name]["kernel"].b
        layers[name] = layer
    peer = layers["fc2"](jax.nn.relu(layers["fc1"](X_BxD)))
    ours = lora_jax.apply(case.fn, case.params, ad, X_BxD)
    assert float(jnp.max(jnp.abs(ours - case.fn(case.params, X_BxD)))) > 1e-2
    np.testing.assert_allclose(ours, peer, atol=1e-5, rtol=1e-5)


def test_matches_qwix_lora():
    """qwix scales its branch by alpha/rank, as lora_jax's "standard" scaling does."""
    qwix = pytest.importorskip("qwix")
    nnx, case, ad = _nnx_mlp_with_adapters(rank=2)
    model = nnx.merge(nnx.graphdef(_nnx_dense(nnx, nnx.Rngs(0))), case.params)
    provider = qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0)
    lora_model = qwix.apply_lora_to_model(model, provider, X_BxD, rngs=nnx.Rngs(1))
    for name in ("fc1", "fc2"):
        layer = getattr(lora_model, name)
        assert layer.kernel_lora_a.shape == ad[name]["kernel"].a.shape
        layer.kernel_lora_a[...] = ad[name]["kernel"].a
        layer.kernel_lora_b[...] = ad[name]["kernel"].b
    np.testing.assert_allclose(lora_jax.apply(case.fn, case.params, ad, X_BxD), lora_model(X_BxD),
                               atol=1e-5, rtol=1e-5)
