"""Named adapters on disk: save, list, load, refuse the wrong base; swap without recompiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax
from lora_jax.library import AdapterLibrary


def _ad(case, seed, rank=2):
    spec = lora_jax.LoraSpec(targets=case.targets, rank=rank)
    return zoo.randomize(lora_jax.init(jax.random.key(seed), case.fn, case.params, *case.args, spec=spec),
                         seed=seed), spec


def test_save_list_load_round_trip(tmp_path):
    case = zoo.scanned()
    lib = AdapterLibrary(str(tmp_path))
    ad, spec = _ad(case, 1)
    lib.save("legal", ad, case.params, "zoo/scanned", spec)
    lib.save("json", _ad(case, 2)[0], case.params, "zoo/scanned")
    assert lib.names() == ["json", "legal"]
    back = lib.load("legal", case.params, "zoo/scanned")
    assert jax.tree.structure(back) == jax.tree.structure(ad)
    np.testing.assert_array_equal(lora_jax.apply(case.fn, case.params, back, *case.args),
                                  lora_jax.apply(case.fn, case.params, ad, *case.args))


def test_wrong_base_is_refused_saying_what_differs(tmp_path):
    case = zoo.plain_mlp()
    lib = AdapterLibrary(str(tmp_path))
    lib.save("a", _ad(case, 1)[0], case.params, "mlp-v1")
    with pytest.raises(lora_jax.LoraError, match=r"adapter 'a' was trained on another base: "
                                                 r"base_source: checkpoint 'mlp-v1', now 'mlp-v2'"):
        lib.load("a", case.params, "mlp-v2")
    wider = {**case.params, "w2": jnp.zeros((12, 3))}
    with pytest.raises(lora_jax.LoraError, match=r"base_structure: checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):
        lib.load("a", wider, "mlp-v1")
    with pytest.raises(lora_jax.LoraError, match=r"no adapter at .*missing"):
        lib.load("missing", case.params, "mlp-v1")


def test_swapping_same_spec_adapters_does_not_recompile():
    case = zoo.linen_block()
    traces = []

    @jax.jit
    def run(adapters, x):
        traces.append(1)
        return lora_jax.apply(case.fn, case.params, adapters, x)

    (x,) = case.args
    a, b = _ad(case, 1)[0], _ad(case, 2)[0]
    ya, yb, ya2 = run(a, x), run(b, x), run(a, x)
    assert len(traces) == 1
    assert float(jnp.abs(ya - yb).max()) > 1e-3
    np.testing.assert_array_equal(ya, ya2)
    run(_ad(case, 3, rank=4)[0], x)  # another rank: other shapes, one more trace
    assert len(traces) == 2
