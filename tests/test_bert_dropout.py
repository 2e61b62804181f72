"""The BERT family's own dropout (model.dropout): off unless a "dropout" rng is given."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.errors import LoraError
from lora_jax.models.bert import BertConfig, BertModel
from lora_jax.models.loading import LoadedModel
from lora_jax.train_step import model_apply


def _model(scan: bool, rate: float = 0.1) -> LoadedModel:
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, scan_layers=scan, hidden_dropout_prob=rate,
                     attention_probs_dropout_prob=rate)
    module = BertModel(cfg)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 50
    params = module.init(jax.random.key(0), ids)
    fn = lambda p, i, m=None: module.apply(p, i, m)  # noqa: E731
    return LoadedModel(fn, params, cfg, None, "bert", "", module, {}), ids


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_only_with_a_key_and_the_same_for_the_same_key(scan):
    model, ids = _model(scan)
    mask = jnp.ones_like(ids).at[1, 4:].set(0)
    plain = model.fn(model.params, ids, mask)
    drop = model.dropout_fn()
    a = drop(model.params, jax.random.key(1), ids, mask)
    np.testing.assert_array_equal(a, drop(model.params, jax.random.key(1), ids, mask))
    assert not np.allclose(a, plain, atol=1e-3)
    assert not np.allclose(a, drop(model.params, jax.random.key(2), ids, mask), atol=1e-3)
    np.testing.assert_array_equal(plain, model.module.apply(model.params, ids, mask))


def test_zero_rates_give_the_plain_forward():
    model, ids = _model(False, rate=0.0)
    np.testing.assert_array_equal(model.dropout_fn()(model.params, jax.random.key(1), ids),
                                  model.fn(model.params, ids))


def test_the_train_step_model_uses_dropout_only_with_an_rng_and_adapters_get_gradients():
    model, ids = _model(True)
    spec = lora_jax.LoraSpec(targets=r".*/(query|value)/kernel", rank=4, alpha=8.0)
    adapters = lora_jax.init(jax.random.key(3), model.fn, model.params, ids, spec=spec)
    run = model_apply("lora", model.fn, model.dropout_fn())
    trainable = {"adapters": adapters, "extra": {}}
    rng = jax.random.key(4)
    np.testing.assert_array_equal(run(trainable, model.params, ids),
                                  lora_jax.apply(model.fn, model.params, adapters, ids))
    expected = lora_jax.apply(model.dropout_fn(), model.params, adapters, jax.random.fold_in(rng, 1), ids)
    np.testing.assert_allclose(run(trainable, model.params, ids, rng=rng), expected, atol=1e-6)
    grads = jax.grad(lambda t: jnp.sum(run(t, model.params, ids, rng=rng) ** 2))(trainable)
    b_grads = [g.b for g in jax.tree.leaves(grads["adapters"], is_leaf=lambda x: hasattr(x, "a"))]
    assert b_grads and all(float(jnp.abs(g).max()) > 0 for g in b_grads)  # B = 0: A gets none yet


def test_decoders_have_no_dropout_to_offer():
    model, _ = _model(False)
    llama = LoadedModel(model.fn, model.params, model.config, None, "llama", "", model.module, {})
    with pytest.raises(LoraError, match="BERT-family"):
        llama.dropout_fn()
