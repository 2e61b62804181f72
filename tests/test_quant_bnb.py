"""lora_jax.quant against bitsandbytes' CPU functions: codes, absmax, nested absmax and offset,
and dequantised weights equal bit for bit (they skip, saying why, without bitsandbytes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_quant import KINDS_4BIT, bits, make_weight

import lora_jax.quant as quant
from lora_jax.quant import blockwise, codes, torch_mean


@pytest.fixture(scope="module")
def bnb():
    pytest.importorskip("torch", reason="the bitsandbytes parity tests need torch (the parity extra)")
    bnb = pytest.importorskip("bitsandbytes", reason="the parity tests need bitsandbytes (the parity extra)")
    import torch

    # bitsandbytes torch.compiles its PyTorch 4-bit dequantiser; compiling it for every shape
    # takes longer than the tests, and the eager kernel computes the same float32 products.
    disabled = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield bnb.functional
    torch._dynamo.config.disable = disabled


@pytest.fixture
def torch_lanes(monkeypatch):
    """torch sums float32 in 16 lanes on AVX-512 CPUs, 8 elsewhere; the offset follows it."""
    import torch

    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    monkeypatch.setattr(torch_mean, "SUM_LANES", 16 if avx512 else 8)
    return avx512


def to_torch(w):
    import torch

    w = np.asarray(w)
    if w.dtype == jnp.bfloat16:
        return torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(w))


def from_torch(t):
    import torch

    t = t.detach()
    return t.float().numpy().astype(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def bnb_torch_kernel(shape, blocksize, avx512):
    """Whether bitsandbytes' CPU dequantize_4bit falls back to its PyTorch kernel, which gives
    FP4's code 8 as +0 where its native kernel (and ours, and CUDA) gives -0."""
    return shape[-1] % 2 == 1 or (avx512 and blocksize >= 2048)


def assert_4bit_parity(F, w, kind, blocksize, ours, mine, avx512):
    """Our QuantizedWeight and dequantised weight against bitsandbytes' on the same weight."""
    double_quant = ours.double_quant
    packed, state = F.quantize_4bit(
        to_torch(w), blocksize=blocksize, quant_type=kind, compress_statistics=double_quant
    )
    np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
    if double_quant:
        np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
        np.testing.assert_array_equal(bits(ours.nested_absmax), bits(state.state2.absmax.numpy()))
        np.testing.assert_array_equal(bits(ours.offset), bits(state.offset.numpy()))
        np.testing.assert_array_equal(bits(codes.dynamic_map()), bits(state.state2.code.numpy()))
    else:
        assert ours.nested_absmax is None
        np.testing.assert_array_equal(bits(ours.absmax), bits(state.absmax.numpy()))
    theirs = from_torch(F.dequantize_4bit(packed, state)).reshape(w.shape)  # bnb gives 1-D as [1, n]
    mine = np.asarray(mine)
    assert mine.dtype == theirs.dtype
    if kind == "fp4" and bnb_torch_kernel(w.shape, blocksize, avx512):
        np.testing.assert_array_equal(mine, theirs)  # values equal, the sign of zero aside
    else:
        np.testing.assert_array_equal(bits(mine), bits(theirs))


def _both(w, kind, blocksize):
    """(q, dequantize(q)) without and with double quantisation, all in one jit: dequantising
    under jit is where XLA would fuse products and sums into fmas."""
    qs = quant.quantize(w, kind, blocksize, False), quant.quantize(w, kind, blocksize, True)
    return [(q, quant.dequantize(q)) for q in qs]


_both_jit = jax.jit(_both, static_argnums=(1, 2))
_dequantize_jit = jax.jit(quant.dequantize)


def check_both(F, w, kind, blocksize, avx512):
    """Parity with and without double quantisation."""
    for ours, mine in _both_jit(w, kind, blocksize):
        assert_4bit_parity(F, np.asarray(w), kind, blocksize, ours, mine, avx512)


@pytest.mark.parity
@pytest.mark.parametrize("blocksize", quant.BLOCKSIZES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_4bit_matches_bitsandbytes(bnb, torch_lanes, kind, dtype, blocksize):
    check_both(bnb, jnp.asarray(make_weight(kind, blocksize)).astype(dtype), kind, blocksize, torch_lanes)


@pytest.mark.parity
@pytest.mark.parametrize("kind", KINDS_4BIT)
@pytest.mark.parametrize(
    "shape, blocksize",
    [((5, 129), 64), ((1000,), 64), ((64, 1058), 32)],
    ids=["odd-row", "1-d", "9-nested-blocks"],
)
def test_4bit_odd_shapes_match_bitsandbytes(bnb, torch_lanes, kind, shape, blocksize):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.1, 3), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        check_both(bnb, w.astype(dtype), kind, blocksize, torch_lanes)


@pytest.mark.parity
@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_all_zero_weights_match_bitsandbytes(bnb, torch_lanes, kind):
    check_both(bnb, jnp.zeros((4, 128)), kind, 64, torch_lanes)  # no partial block: all agrees
    # With a partial block bitsandbytes stores its absmax as 1e-38, a float32 subnormal; its
    # mean then is subnormal too and XLA flushes it to zero, so only the codes and the weight
    # (zeros either way) agree under double quantisation.
    partial = jnp.zeros((4, 130))
    (plain, plain_w), (nested, nested_w) = _both_jit(partial, kind, 64)
    assert_4bit_parity(bnb, np.asarray(partial), kind, 64, plain, plain_w, torch_lanes)
    packed, state = bnb.quantize_4bit(
        to_torch(partial), blocksize=64, quant_type=kind, compress_statistics=True
    )
    np.testing.assert_array_equal(np.asarray(nested.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(nested_w), from_torch(bnb.dequantize_4bit(packed, state)))


@pytest.mark.parity
def test_transposed_flax_kernel_matches_bitsandbytes_on_the_torch_weight(bnb, torch_lanes):
    w_oi = make_weight("nf4", 64)
    q = quant.quantize(np.ascontiguousarray(w_oi.T), "nf4", transpose=True)
    packed, state = bnb.quantize_4bit(
        to_torch(w_oi), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(
        bits(quant.dequantize(q)), bits(from_torch(bnb.dequantize_4bit(packed, state)).T)
    )


@pytest.mark.parity
def test_offset_of_many_blocks_matches_one_thread_torch(bnb, torch_lanes):
    """32832 blocks: torch splits a sum this long over its threads; ours is its 1-thread order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = np.random.default_rng(3).standard_normal((1024, 1026)).astype(np.float32)
        nested = jax.jit(quant.quantize, static_argnums=(1, 2, 3))(w, "nf4", 32, True)
        assert_4bit_parity(bnb, w, "nf4", 32, nested, _dequantize_jit(nested), torch_lanes)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parity
def test_torch_sum_order(bnb, torch_lanes):
    import torch

    rng = np.random.default_rng(4)
    for n in (1, 7, 8, 9, 33, 64, 257, 1000, 4097, 20001):
        x = rng.uniform(0, 10, n).astype(np.float32)
        ours = jax.jit(torch_mean.torch_cpu_mean, static_argnums=1)(x, torch_mean.SUM_LANES)
        np.testing.assert_array_equal(bits(ours), bits(torch.from_numpy(x).mean().numpy()), err_msg=f"n={n}")


@pytest.mark.parity
def test_8bit_absmax_quantiser_matches_bitsandbytes(bnb):
    """The nested quantiser alone, on its hard cases: every code value, every midpoint between
    two, the 65536-point grid's half-way points around each change of code, a zero block, a
    partial block."""
    import torch

    dyn = codes.dynamic_map()
    lut = codes.dynamic_lut()
    changes = np.nonzero(lut[1:] != lut[:-1])[0] + 1
    grid_halfway = np.float32(2) * (changes.astype(np.float32) - np.float32(0.5)) / np.float32(
        65535
    ) - np.float32(1)
    hard = np.concatenate(
        [
            dyn,
            (dyn[:-1] + dyn[1:]) / 2,
            grid_halfway,
            np.nextafter(grid_halfway, 2),
            np.nextafter(grid_halfway, -2),
        ]
    )
    hard = hard.astype(np.float32)
    x = np.concatenate([[1.0], hard[:255], np.zeros(256), [1.0], hard[255:], 3 * np.resize(hard, 77)]).astype(
        np.float32
    )
    q, absmax = jax.jit(blockwise.quantize_8bit)(x)
    q_ref, state = bnb.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    np.testing.assert_array_equal(np.asarray(q), q_ref.numpy())
    np.testing.assert_array_equal(bits(absmax), bits(state.absmax.numpy()))
    back = jax.jit(blockwise.dequantize_8bit)(q, absmax)
    np.testing.assert_array_equal(bits(back), bits(bnb.dequantize_blockwise(q_ref, state).numpy()))


@pytest.mark.parity
def test_code_tables_match_bitsandbytes(bnb):
    np.testing.assert_array_equal(bits(codes.NF4), bits(bnb.get_4bit_type("nf4", device="cpu").numpy()))
    theirs = bnb.get_4bit_type("fp4", device="cpu").numpy()
    np.testing.assert_array_equal(codes.FP4, theirs)  # bnb's table has +0 at code 8 (an int -0)
    assert bits(codes.FP4)[8] == 0x80000000 and np.all(bits(codes.FP4)[:8] == bits(theirs)[:8])
    np.testing.assert_array_equal(bits(codes.dynamic_map()), bits(bnb.create_dynamic_map().numpy()))


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_int8_matches_bitsandbytes(bnb, dtype):

    rng = np.random.default_rng(5)
    w = (rng.standard_normal((37, 130)) * rng.uniform(0.01, 4, (37, 1))).astype(np.float32)
    w[3] = 0
    w[5] = np.concatenate([[127.0], np.arange(129) % 20 + 0.5])  # scale 1: exact .5 ties, to even
    w = np.asarray(jnp.asarray(w).astype(dtype))
    cb, scb, _ = bnb.int8_vectorwise_quant(to_torch(w))
    q = quant.quantize(w, "int8")
    nonzero = np.any(w != 0, axis=1)
    np.testing.assert_array_equal(np.asarray(q.codes)[nonzero], cb.numpy()[nonzero])  # bnb: round(0 * inf)
    assert np.all(np.asarray(q.codes)[~nonzero] == 0)
    np.testing.assert_array_equal(bits(q.absmax), bits(scb.numpy()))
    theirs = bnb.int8_vectorwise_dequant(cb, scb).numpy()
    np.testing.assert_array_equal(bits(quant.dequantize(q, jnp.float32)), bits(theirs))
