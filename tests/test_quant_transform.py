"""QLoRA: init / apply / merge on a quantised frozen base, against the dense dequantised base."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from flax import linen as nn

import lora_jax
import lora_jax.models as M
import lora_jax.quant as quant
from lora_jax.adapters import adapter_items

# Each case with the format its weights are quantised in (stack_axes=1: scanned layers).
FORMATS = {
    "linen_block": dict(kind="nf4", blocksize=32, double_quant=False, transpose=True),  # Dense(General)
    "scanned": dict(kind="nf4", blocksize=32, transpose=True, stack_axes=1),  # nn.scan + remat
    "tied_embedding": dict(kind="int8"),  # gather + x·Eᵀ on one table
}
QUANTISED = r".*/(kernel|embedding)"


@functools.cache
def _quantised_case(name):
    case = zoo.CASES[name]()
    return case, jax.jit(lambda p: quant.quantize_params(p, QUANTISED, **FORMATS[name]))(case.params)


@functools.cache
def _setup(name):
    case, params_q = _quantised_case(name)
    return case, params_q, _adapters(case, params_q)


def _adapters(case, params_q, seed=0, rank=2):
    spec = lora_jax.LoraSpec(targets=case.targets, rank=rank, alpha=4.0)
    return zoo.randomize(lora_jax.init(jax.random.key(seed), case.fn, params_q, *case.args, spec=spec),
                         seed=seed)


def _reference(case, params_q, adapters):
    """fn on the dense dequantised base with the adapters merged: what QLoRA must compute."""
    merged_fn = lambda p, a, *args: case.fn(lora_jax.merge(quant.dequantize_params(p), a), *args)
    return jax.jit(merged_fn)(params_q, adapters, *case.args)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_factored_equals_merged_dequantised(name):
    case, params_q, adapters = _setup(name)
    out = jax.jit(lambda p, a, *args: lora_jax.apply(case.fn, p, a, *args))(params_q, adapters, *case.args)
    ref = _reference(case, params_q, adapters)
    base = jax.jit(case.fn)(quant.dequantize_params(params_q), *case.args)
    assert float(jnp.max(jnp.abs(ref - base))) > 1e-2  # the adapters really change the output
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_grads_reach_only_the_adapters():
    case, params_q, adapters = _setup("scanned")

    def loss(p, a):
        return jnp.sum(jnp.sin(lora_jax.apply(case.fn, p, a, *case.args)))

    def loss_ref(p, a):
        return jnp.sum(jnp.sin(case.fn(lora_jax.merge(quant.dequantize_params(p), a), *case.args)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))
    g_base, g_ad = grad(params_q, adapters)
    r_base, r_ad = jax.jit(jax.grad(loss_ref, argnums=(0, 1), allow_int=True))(params_q, adapters)
    for x, y in zip(jax.tree.leaves(g_ad), jax.tree.leaves(r_ad), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=1e-4)
    def parts(g):
        qs = [x for x in jax.tree.leaves(g, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
        scales = [s for x in qs for s in (x.absmax, x.nested_absmax, x.offset)]
        return [x.codes for x in qs], [s for s in scales if jnp.issubdtype(s.dtype, jnp.floating)]

    (codes, scales), (_, ref_scales) = parts(g_base), parts(r_base)
    assert len(codes) == 6 and any(np.any(np.asarray(x) != 0) for x in ref_scales)
    assert all(not np.any(np.asarray(x)) for x in scales)  # no path to the scales
    assert all(x.dtype == jax.dtypes.float0 for x in codes)  # nor to the codes


def test_mixed_adapter_batch_on_a_quantised_stack():
    case, params_q = _quantised_case("scanned")
    ads = [_adapters(case, params_q, seed=i, rank=1 + i) for i in range(2)]
    (x,) = case.args
    x = jnp.concatenate([x, 1.5 * x])  # 4 examples
    index = jnp.array([1, 0, -1, 1], jnp.int32)
    mixed = jax.jit(lambda p, s, x, i: lora_jax.apply(case.fn, p, s, x, adapter_index=i))(
        params_q, lora_jax.stack_adapters(ads), x, index)
    dense, fn = quant.dequantize_params(params_q), jax.jit(case.fn)
    for row, j in enumerate(np.asarray(index).tolist()):
        ref = fn(dense if j < 0 else lora_jax.merge(dense, ads[j]), x)
        np.testing.assert_allclose(np.asarray(mixed[row]), np.asarray(ref[row]), atol=1e-5, rtol=1e-5)


def test_merge_returns_a_dense_tree():
    case, params_q, adapters = _setup("linen_block")
    merged = lora_jax.merge(params_q, adapters)
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
    assert jax.tree.structure(merged) == jax.tree.structure(case.params)
    expected = lora_jax.merge(quant.dequantize_params(params_q), adapters)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    kernel = merged["params"]["Attention_0"]["query"]["kernel"]
    assert kernel.shape == (8, 2, 4) and kernel.dtype == jnp.float32


D, LAYERS = 256, 8


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(D, name="up")(x))), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):  # no remat: the dequantised weights must not be kept for backward
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        return scan(name="layers")(x, None)[0]


def test_a_scanned_step_holds_one_layer_dequantised():
    model, x = _Stack(), jnp.ones((4, D))
    params = model.init(jax.random.key(0), x)
    fn = lambda p, x: model.apply(p, x)
    params_q = jax.jit(lambda p: quant.quantize_params(p, r".*/kernel", "nf4", double_quant=False,
                                                       transpose=True, stack_axes=1))(params)
    adapters = lora_jax.init(jax.random.key(1), fn, params_q, x,
                             spec=lora_jax.LoraSpec(targets=r".*/up/kernel", rank=4))

    def temp_bytes(dequantise_first):
        def loss(a, p, x):
            p = quant.dequantize_params(p) if dequantise_first else p
            return jnp.sum(lora_jax.apply(fn, p, a, x) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(adapters, params_q, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    layer_f32 = 2 * D * D * 4  # one layer's two kernels, dequantised
    bound = 1.5 * layer_f32
    dense_bf16 = LAYERS * 2 * D * D * 2
    assert dense_bf16 > 2 * bound  # the dense bf16 stack alone is far over the bound
    assert temp_bytes(False) <= bound
    assert temp_bytes(True) > LAYERS * layer_f32  # the same step dequantising up front


_quantize_plain = jax.jit(lambda p: quant.quantize_params(p, r"w\d", "nf4", transpose=True))


def _plain(p, x):
    return jnp.tanh(x @ p["w0"]) @ p["w1"]


@pytest.mark.parametrize("fn, params, message", [
    (lambda p, x: _plain(p, x) * jnp.sum(p["w1"]), None,
     r"quantised weight 'w1' reaches 'reduce_sum', where it cannot be dequantised"),
    (lambda p, x: _plain(p, x) + p["w1"][0, 0] * 0, None,
     r"quantised weight 'w1' reaches 'mul', where it cannot be dequantised"),
    (_plain, {"tag": "v1"}, r"params leaf 'tag' is a str, not an array"),
    (lambda p, x: jax.lax.scan(lambda c, w: (c, c @ w), x @ p["w0"], p["w1"][None])[1],
     None, r"'w1' reaches a scan through 'broadcast_in_dim'"),
    (lambda p, x: (_plain(p, x), p["w1"]), None, r"fn returns the quantised weight 'w1' itself"),
    (lambda p, x: jax.lax.scan(lambda c, w: (c, c @ w), x @ p["w0"], p["w2"])[1], None,
     r"quantised weight 'w2' is sliced by a scan along its first axis, but it was quantised as one "
     r"block; quantise it with stack_axes=1"),
])
def test_bad_input_is_one_line_naming_the_path(fn, params, message):
    rng = np.random.default_rng(0)
    dense = {"w0": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
             "w1": jnp.asarray(rng.standard_normal((32, 64)), jnp.float32),
             "w2": jnp.ones((2, 32, 64))}  # a stack quantised as one weight
    params_q = {**_quantize_plain(dense), **(params or {})}
    x = jnp.ones((3, 64))
    spec = lora_jax.LoraSpec(targets="w0", rank=2)
    with pytest.raises(lora_jax.LoraError, match=message) as e:
        adapters = lora_jax.init(jax.random.key(0), fn, params_q, x, spec=spec)
        lora_jax.apply(fn, params_q, adapters, x)
    assert "\n" not in str(e.value)


def test_llama_scanned_through_apply():
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
               intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=32)
    model = M.from_config(cfg, seed=0, scan_layers=True)

    @jax.jit
    def quantize(p):  # the layers' stacked kernels one layer at a time, the head as one weight
        p = quant.quantize_params(p, r".*/layers/.*/kernel", "nf4", transpose=True, stack_axes=1)
        return quant.quantize_params(p, r".*/lm_head/kernel", "nf4", transpose=True)

    params_q = quantize(model.params)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 96
    spec = lora_jax.LoraSpec(targets=M.DEFAULT_TARGETS["llama"], rank=4, alpha=8.0)
    adapters = zoo.randomize(lora_jax.init(jax.random.key(0), model.fn, params_q, ids, spec=spec))
    assert {p for p, _ in adapter_items(adapters)} == {"params/model/layers/self_attn/q_proj/kernel",
                                                      "params/model/layers/self_attn/v_proj/kernel"}
    logits = jax.jit(lambda p, a, ids: lora_jax.apply(model.fn, p, a, ids))(params_q, adapters, ids)
    ref = jax.jit(model.fn)(lora_jax.merge(params_q, adapters), ids)
    assert logits.shape == (2, 6, 96)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=1e-5)
