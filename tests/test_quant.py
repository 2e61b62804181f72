"""lora_jax.quant on its own: code tables, ties, round-trip error, jit, pytrees, errors.

Parity with bitsandbytes itself is in test_quant_bnb.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax.quant as quant
from lora_jax.errors import LoraError
from lora_jax.quant import blockwise, codes

KINDS_4BIT = ("nf4", "fp4")


def bits(x):
    """The raw bits of a float array, so that -0 != +0 and equal means identical."""
    x = np.asarray(x)
    return x.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize])


def tie_values(kind: str, size: int) -> np.ndarray:
    """A block whose absmax is 1 (so it scales by exactly 1), then every midpoint between two
    code values and its float32 neighbours, cycled to `size`."""
    mids, _ = codes.bounds_4bit(kind)
    near = np.concatenate([mids, np.nextafter(mids, 2), np.nextafter(mids, -2), [0.0, -0.0, 1e-30, -1e-30]])
    near = near[(near == 0) | (np.abs(near) >= np.finfo(np.float32).tiny)]  # XLA flushes subnormals
    return np.concatenate([[1.0], np.resize(near, size - 1)]).astype(np.float32)


def make_weight(kind: str, blocksize: int, rows: int = 3, seed: int = 0) -> np.ndarray:
    """[rows, 2*blocksize + 34] float32: random blocks at different scales, an all-zero block, a
    block of exact ties, and a last block of 102 % blocksize elements whose absmax is 4 (a power
    of two, so the division there is exact) holding ties too. The row length is even and not a
    multiple of 16, which keeps bitsandbytes on its scalar CPU kernel on any x86 CPU."""
    rng = np.random.default_rng(seed)
    cols = 2 * blocksize + 34
    flat = (
        rng.standard_normal(rows * cols)
        * np.repeat(rng.uniform(0.01, 5, rows * cols // blocksize + 1), blocksize)[: rows * cols]
    ).astype(np.float32)
    flat[blocksize : 2 * blocksize] = 0
    flat[2 * blocksize : 3 * blocksize] = tie_values(kind, blocksize)
    tail = flat.size % blocksize
    flat[flat.size - tail :] = 4 * tie_values(kind, tail)
    return flat.reshape(rows, cols)


def test_tables():
    assert codes.NF4.shape == (16,) and np.all(np.diff(codes.NF4) > 0) and codes.NF4[7] == 0
    assert sorted(np.abs(codes.FP4 * 12).tolist()) == sorted([0, 0.0625, 2, 3, 4, 6, 8, 12] * 2)
    dyn = codes.dynamic_map()
    assert dyn.shape == (256,) and np.all(np.diff(dyn) > 0) and dyn[-1] == 1
    np.testing.assert_array_equal(dyn[:127], -dyn[128:255][::-1])


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_ties_take_the_lower_code(kind):
    mids, order = codes.bounds_4bit(kind)
    table = codes.TABLES_4BIT[kind]
    x = np.concatenate([[1.0], mids]).astype(np.float32)
    q, absmax = blockwise.quantize_4bit(jnp.asarray(np.pad(x, (0, 32 - x.size))), kind, 32)
    unpacked = np.stack([np.asarray(q) >> 4, np.asarray(q) & 15], -1).reshape(-1)[1 : 1 + mids.size]
    np.testing.assert_array_equal(unpacked, order[:-1])  # midpoint i -> sorted value i, the lower
    assert absmax[0] == 1 and np.all(table[unpacked] <= mids)


@pytest.mark.parametrize("kind", KINDS_4BIT)
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_within_half_a_code_step(kind, double_quant):
    w = make_weight(kind, 64, rows=8)
    q = quant.quantize(w, kind, 64, double_quant)
    n = w.size
    absmax = np.asarray(
        q.absmax
        if not double_quant
        else blockwise.dequantize_nested_absmax(q.absmax, q.nested_absmax, q.offset)
    )
    true_absmax = np.max(np.abs(np.pad(w.reshape(-1), (0, -n % 64)).reshape(-1, 64)), axis=1)
    gap = np.max(np.diff(np.sort(codes.TABLES_4BIT[kind])))
    per_elem_true = np.repeat(true_absmax, 64)[:n]
    per_elem_err = np.repeat(np.abs(absmax - true_absmax), 64)[:n]
    err = np.abs(np.asarray(quant.dequantize(q)).reshape(-1) - w.reshape(-1))
    assert np.all(err <= gap / 2 * per_elem_true + per_elem_err + 1e-6 * per_elem_true)
    if double_quant:  # the absmax itself is off by at most half a step of the 8-bit map (+ its 2/65535 grid)
        nested = np.repeat(np.asarray(q.nested_absmax), 256)[: absmax.size]
        step8 = np.max(np.diff(codes.dynamic_map()))
        assert np.all(np.abs(absmax - true_absmax) <= (step8 / 2 + 2 / 65535) * nested + 1e-6 * true_absmax)


def test_int8_round_trip_error_within_half_a_step():
    w = make_weight("nf4", 32, rows=5)
    w[2] = 0
    q = quant.quantize(w, "int8")
    scb = np.max(np.abs(w), axis=1, keepdims=True)
    err = np.abs(np.asarray(quant.dequantize(q)) - w)
    assert np.all(err <= scb / 127 / 2 + 1e-6 * scb) and q.codes.dtype == jnp.int8
    assert np.all(np.asarray(q.codes)[2] == 0) and np.asarray(q.absmax)[2] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", [*KINDS_4BIT, "int8"])
def test_jit_equals_eager_and_the_pytree_survives(kind, dtype):
    w = jnp.asarray(make_weight("nf4", 64)).astype(dtype)
    eager = quant.quantize(w, kind)
    jitted = jax.jit(quant.quantize, static_argnums=1)(w, kind)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))
    mapped = jax.tree.map(lambda x: x, jitted)
    assert isinstance(mapped, quant.QuantizedWeight) and mapped.shape == w.shape and mapped.dtype == dtype
    through = jax.jit(lambda q: q)(jitted)
    assert (through.kind, through.blocksize, through.transpose) == (jitted.kind, jitted.blocksize, False)
    out = jax.jit(quant.dequantize)(through)
    assert out.dtype == dtype and out.shape == w.shape
    np.testing.assert_array_equal(bits(out), bits(quant.dequantize(eager)))
    assert len(jax.tree.leaves(jitted)) == (4 if kind != "int8" else 2)


def test_transpose_stores_the_torch_layout():
    w_io = make_weight("nf4", 64).T  # a Flax kernel [in, out]
    q = quant.quantize(w_io, "nf4", transpose=True)
    ref = quant.quantize(np.ascontiguousarray(w_io.T), "nf4")
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    assert q.shape == w_io.shape and q.stored_shape == w_io.T.shape
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), np.asarray(quant.dequantize(ref)).T)


def test_quantize_params_and_back():
    rng = np.random.default_rng(1)
    params = {
        "params": {
            "query": {
                "kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
                "bias": jnp.zeros(32),
            },
            "value": {
                "kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16),
                "bias": jnp.zeros(32),
            },
            "step": jnp.array(3),
        }
    }
    q = quant.quantize_params(params, r".*/(query|value)/kernel", "nf4", transpose=True)
    assert (
        quant.is_quantized(q["params"]["query"]["kernel"])
        and q["params"]["value"]["kernel"].dtype == "bfloat16"
    )
    assert (
        q["params"]["query"]["bias"] is params["params"]["query"]["bias"]
        and q["params"]["step"] is params["params"]["step"]
    )
    back = jax.jit(quant.dequantize_params)(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert back["params"]["value"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(back["params"]["query"]["kernel"]),
        np.asarray(quant.dequantize(q["params"]["query"]["kernel"])),
    )
    with pytest.raises(LoraError, match="already quantised"):
        quant.quantize_params(q, r".*/query/kernel", "nf4")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: quant.quantize(w, "nf3"), r"quantisation kind 'nf3'; expected one of nf4, fp4, int8"),
        (lambda w: quant.quantize(w, "nf4", 16), r"blocksize=16; bitsandbytes allows 32, 64, .*, 4096"),
        (lambda w: quant.quantize(w, "fp4", 100), r"blocksize=100"),
        (lambda w: quant.quantize(w, "nf4", 64.0), r"blocksize=64.0"),
        (lambda w: quant.quantize(w, "nf4", double_quant=1), r"double_quant=1; expected True or False"),
        (
            lambda w: quant.quantize(w.astype(jnp.int32), "nf4"),
            r"dtype \(nf4 quantises float weights\) is int32",
        ),
        (lambda w: quant.quantize(w, "int8", 64), r"int8 quantises whole rows"),
        (lambda w: quant.quantize(w[0, 0], "nf4"), r"weight of shape \(\); expected at least one dimension"),
        (lambda w: quant.quantize(w[:0], "nf4"), r"weight of shape \(0, 96\)"),
        (lambda w: quant.dequantize(w), r"dequantize needs a QuantizedWeight; got ArrayImpl"),
        (lambda w: quant.dequantize(quant.quantize(w, "nf4"), jnp.int8), r"dequantize dtype is int8"),
        (
            lambda w: quant.quantize_params({"a": {"kernel": w}}, "a/kernal", "nf4"),
            r"target 'a/kernal' matches no parameter; closest paths: a/kernel",
        ),
        (lambda w: quant.quantize_params({"a": {"kernel": w}}, "(", "nf4"), r"not a valid regex"),
        (
            lambda w: quant.quantize_params({"a": {"n": jnp.array([1, 2])}}, "a/n", "nf4"),
            r"params leaf 'a/n': the weight's dtype",
        ),
    ],
)
def test_errors_are_one_clear_line(call, message):
    with pytest.raises(LoraError, match=message) as e:
        call(jnp.ones((4, 96)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind, double_quant", [("nf4", True), ("int8", None)])
def test_a_stack_is_each_layer_quantised_alone(kind, double_quant):
    w = np.stack([make_weight("nf4", 32, rows=4, seed=s).T for s in range(3)])  # [L, in, out]
    q = jax.jit(lambda w: quant.quantize(w, kind, double_quant=double_quant, transpose=True,
                                         stack_axes=1))(w)
    assert q.shape == w.shape and q.stack_axes == 1 and q.stored_shape == (3, *w.shape[:0:-1])
    dense = quant.dequantize(q)
    one = jax.jit(lambda w: quant.quantize(w, kind, double_quant=double_quant, transpose=True))
    for layer in range(3):
        alone = one(w[layer])
        sliced = jax.tree.map(lambda x, i=layer: x[i], q)
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(sliced), strict=True):
            np.testing.assert_array_equal(bits(np.atleast_1d(a)), bits(np.atleast_1d(b)))
        np.testing.assert_array_equal(bits(dense[layer]), bits(quant.dequantize(alone)))
    with pytest.raises(LoraError, match=r"stack_axes=3 for a weight of shape \(3, 98, 4\); expected an "
                       r"int from 0 to 2"):
        quant.quantize(w, kind, double_quant=double_quant, stack_axes=3)
