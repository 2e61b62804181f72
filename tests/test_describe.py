"""`describe`: the dry run agrees with what `init` builds, and lists refusals instead of raising."""

import jax
import jax.numpy as jnp
import pytest
import zoo

import lora_jax
from lora_jax.adapters import adapter_items


@pytest.mark.parametrize("name", ["linen_block", "scanned", "conv_net", "tied_embedding"])
def test_shapes_and_counts_match_init(name):
    case = zoo.CASES[name]()
    spec = lora_jax.LoraSpec(targets=case.targets, rank=2)
    desc = lora_jax.describe(case.fn, case.params, *case.args, spec=spec)
    adapters = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    built = {p: (tuple(a.a.shape), tuple(a.b.shape)) for p, a in adapter_items(adapters)}
    assert {r.path: (r.a_shape, r.b_shape) for r in desc.rows if r.targeted} == built
    assert desc.trainable_count == lora_jax.count_params(adapters)
    assert desc.base_count == lora_jax.count_params(case.params)
    assert [r.path for r in desc.rows if not r.targeted] and not desc.refusals
    assert f"trainable {desc.trainable_count:,} of base {desc.base_count:,}" in str(desc)


def test_abstract_params_allocate_nothing():
    case = zoo.linen_block()
    spec = lora_jax.LoraSpec(targets=case.targets, rank=2)
    abstract = jax.eval_shape(lambda: case.params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    desc = lora_jax.describe(case.fn, abstract, *case.args, spec=spec)
    q = next(r for r in desc.rows if r.path == "params/Attention_0/query/kernel")
    assert (q.shape, q.dtype, q.rank, q.a_shape, q.b_shape) == ((8, 2, 4), "float32", 2, (8, 2), (2, 2, 4))
    row = next(line for line in str(desc).splitlines() if line.startswith(q.path))
    assert row.split() == [q.path, "8x2x4", "float32", "yes", "2", "8x2", "2x2x4", "32"]


def test_refusals_are_reported_per_weight():
    case = zoo.plain_mlp()
    fn = lambda p, x: case.fn({**p, "w0": p["w0"][:, ::-1]}, x)
    spec = lora_jax.LoraSpec(targets=r"w\d", rank=3)
    desc = lora_jax.describe(fn, case.params, *case.args, spec=spec)
    assert set(desc.refusals) == {"w0", "w2"}
    assert "reaches 'rev', which LoRA cannot factor" in desc.refusals["w0"]
    assert "rank 3 for 'w2' exceeds what its 12x2 map allows (at most 2)" in desc.refusals["w2"]
    assert desc.trainable_count == 2 * 12 * 3  # only w1
    assert f"refused w0: {desc.refusals['w0']}" in str(desc)
    with pytest.raises(lora_jax.LoraError, match=desc.refusals["w0"].split(",")[0]):
        lora_jax.init(jax.random.key(0), fn, case.params, *case.args, spec=spec)


def test_bad_params_still_raise():
    case = zoo.plain_mlp()
    spec = lora_jax.LoraSpec(targets=r"w\d", rank=2)
    with pytest.raises(lora_jax.LoraError, match=r"params leaf 'act' is a str, not an array"):
        lora_jax.describe(case.fn, {**case.params, "act": "relu"}, *case.args, spec=spec)
    with pytest.raises(lora_jax.LoraError, match=r"target 'w9' matches no parameter"):
        lora_jax.describe(case.fn, case.params, *case.args, spec=lora_jax.LoraSpec(targets="w9"))
    assert lora_jax.describe(case.fn, case.params, jnp.ones((3, 5)), spec=spec).trainable_count > 0
