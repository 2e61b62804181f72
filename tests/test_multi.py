"""A mixed batch through K stacked adapters equals each row run with its own adapter alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax

CASES = ["linen_block", "scanned", "tied_embedding", "plain_mlp", "nnx_mlp"]


def _adapters(case, k):
    out = []
    for i in range(k):
        spec = lora_jax.LoraSpec(targets=case.targets, rank=1 + i % 2, alpha=2.0 + i)
        ad = lora_jax.init(jax.random.key(i), case.fn, case.params, *case.args, spec=spec)
        out.append(zoo.randomize(ad, seed=100 + i))
    return out


def _batch(case, n):
    """The case's example input tiled to n rows (rows differ so a mix-up would show)."""
    (x,) = case.args
    reps = -(-n // x.shape[0])
    tiled = jnp.concatenate([x] * reps)[:n]
    if jnp.issubdtype(tiled.dtype, jnp.integer):
        return (tiled + jnp.arange(n)[:, None]) % 20
    return tiled * (1.0 + 0.1 * jnp.arange(n, dtype=tiled.dtype).reshape((n,) + (1,) * (tiled.ndim - 1)))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_mixed_batch_equals_each_row_alone(name, k):
    case = zoo.CASES[name]()
    ads = _adapters(case, k)
    n = k + 2
    x = _batch(case, n)
    index = jnp.array([i % k for i in range(k)] + [-1, k - 1], jnp.int32)
    mixed = jax.jit(lambda s, x, i: lora_jax.apply(case.fn, case.params, s, x, adapter_index=i))(
        lora_jax.stack_adapters(ads), x, index)
    single = jax.jit(lambda a, x: lora_jax.apply(case.fn, case.params, a, x))
    alone = {j: single(ads[j], x) for j in set(np.asarray(index).tolist()) if j >= 0}
    alone[-1] = jax.jit(case.fn)(case.params, x)
    for row, j in enumerate(np.asarray(index).tolist()):
        np.testing.assert_allclose(np.asarray(mixed[row]), np.asarray(alone[j][row]), atol=1e-5, rtol=1e-5)


def test_mixed_batch_errors():
    case = zoo.conv_net()
    ads = _adapters(case, 2)
    with pytest.raises(lora_jax.LoraError, match=r"reaches 'conv_general_dilated', which LoRA cannot factor"):
        lora_jax.apply(case.fn, case.params, lora_jax.stack_adapters(ads), *case.args,
                       adapter_index=jnp.array([0, 1]))
    mlp = zoo.plain_mlp()
    with pytest.raises(lora_jax.LoraError, match=r"needs the 3 examples on the leading axis"):
        lora_jax.apply(mlp.fn, mlp.params, lora_jax.stack_adapters(_adapters(mlp, 2)), *mlp.args,
                       adapter_index=jnp.array([0, 1, -1]))
    with pytest.raises(lora_jax.LoraError, match=r"adapter 1 targets other weights than adapter 0"):
        lora_jax.stack_adapters([_adapters(mlp, 1)[0], {"w0": _adapters(mlp, 1)[0]["w0"]}])


def test_mixed_batch_benchmark_runs_and_reports_all_three_ways():
    from benchmarks import mixed_batch as mb

    cfg = dict(mb.CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    res = mb.measure(k=2, batch=4, seq=8, rank=2, repeats=1, config=cfg)
    assert set(res["seconds"]) == {"mixed", "one_adapter", "loop_over_adapters"}
    assert all(v > 0 for v in res["tokens_per_s"].values())
