"""Chunked LM loss: same value and gradient as the plain one (head alone, through LoRA on an
lm_head or a tied embedding, full fine-tuning), no [B,T,V] logits, and XLA's memory analysis."""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.adapters import adapter_items
from lora_jax.errors import LoraError
from lora_jax.models import from_config
from lora_jax.models.lm_loss import CHUNK_POSITIONS, chunked_target_logp, head_logits, next_token_fn
from lora_jax.tasks.causal_lm import next_token_loss, training_loss

V = 97
LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, hidden_size=32,
    intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False, hidden_act="silu",
)
HEAD = {False: "params/lm_head/kernel", True: "params/model/embed_tokens/embedding"}
B, T = 3, 13
MASKS = {"unmasked": np.ones((B, T), np.int32),
         "padded": (np.arange(T)[None, :] < np.array([[T], [8], [11]])).astype(np.int32)}


def _close(got, want):
    """Within 1e-5 of the plain result, relative to its largest entry (float32)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * max(np.abs(w).max(), 1e-30))


def _plain_logp(h_BxTxD, w, tied, targets_BxT):
    logits_BxTxV = jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", h_BxTxD, w)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


def _shapes_in(jaxpr) -> set[tuple[int, ...]]:
    """Every value shape in a jaxpr, nested ones (scan, remat, jit bodies) included."""
    found = set()
    for eqn in jaxpr.eqns:
        found |= {tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")}
        for sub in jex.core.jaxprs_in_params(eqn.params):
            found |= _shapes_in(sub)
    return found


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [5, 13, CHUNK_POSITIONS])  # remainder, exact, one chunk
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_chunked_head_equals_the_plain_log_softmax(tied, chunk, mask):
    rng = np.random.default_rng(0)
    h_BxTxD = jnp.asarray(rng.standard_normal((B, T, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((V, 16) if tied else (16, V)), jnp.float32)
    targets_BxT = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weight_BxT = jnp.asarray(MASKS[mask], jnp.float32)

    def loss(logp_fn):
        return lambda h, w: -jnp.sum(logp_fn(h, w) * weight_BxT) / jnp.sum(weight_BxT)

    plain = loss(lambda h, w: _plain_logp(h, w, tied, targets_BxT))
    chunked = loss(lambda h, w: chunked_target_logp(h, w, tied, targets_BxT, chunk))
    _close(chunked_target_logp(h_BxTxD, w, tied, targets_BxT, chunk),
           _plain_logp(h_BxTxD, w, tied, targets_BxT))
    _close(jax.value_and_grad(chunked, argnums=(0, 1))(h_BxTxD, w),
           jax.value_and_grad(plain, argnums=(0, 1))(h_BxTxD, w))


@pytest.mark.parametrize("tied", [False, True])
def test_lora_on_the_head_is_factored_inside_the_chunks_with_the_plain_gradient(tied):
    model = from_config({**LLAMA, "tie_word_embeddings": tied}, seed=0)
    fn = next_token_fn(model, chunk=5)
    ids_BxT = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    spec = lora_jax.LoraSpec(targets=(HEAD[tied], r".*q_proj/kernel"), rank=4)
    adapters = lora_jax.init(jax.random.key(1), fn, model.params, ids_BxT, MASKS["padded"], spec=spec)
    leaves, tree = jax.tree.flatten(adapters)  # random B != 0, so the head's branch counts
    noise = np.random.default_rng(2).standard_normal(sum(x.size for x in leaves)) * 0.05
    cuts = np.cumsum([x.size for x in leaves])[:-1]
    adapters = tree.unflatten([x + n.reshape(x.shape) for x, n in zip(leaves, np.split(noise, cuts))])
    head = dict(adapter_items(adapters))[HEAD[tied]]

    def chunked(ad, mask_BxT):
        batch = {"input_ids": ids_BxT, "attention_mask": mask_BxT}
        return training_loss(lambda *a: lora_jax.apply(fn, model.params, ad, *a), batch)[0]

    def plain(ad, mask_BxT):
        logits_BxTxV = lora_jax.apply(fn, model.params, ad, ids_BxT, mask_BxT)
        return next_token_loss(logits_BxTxV, ids_BxT, mask_BxT)

    chunked_grad, plain_grad = (jax.jit(jax.value_and_grad(f)) for f in (chunked, plain))
    for mask_BxT in MASKS.values():
        _close(chunked_grad(adapters, mask_BxT), plain_grad(adapters, mask_BxT))
    grad_jaxpr = jax.make_jaxpr(jax.grad(chunked))(adapters, MASKS["padded"]).jaxpr
    assert (B, T, V) not in _shapes_in(grad_jaxpr)
    assert (B, T, V) in _shapes_in(jax.make_jaxpr(jax.grad(plain))(adapters, MASKS["padded"]).jaxpr)
    scans = [e for e in grad_jaxpr.eqns if e.primitive.name == "scan"]
    chunk_scan = [e for e in scans if (B, 5, V) in _shapes_in(e.params["jaxpr"].jaxpr)]
    assert chunk_scan and {head.a.shape, head.b.shape} & _shapes_in(chunk_scan[0].params["jaxpr"].jaxpr)


def test_full_fine_tuning_gradient_and_both_fn_paths_match_the_plain_loss():
    model = from_config({**LLAMA, "tie_word_embeddings": True}, seed=2)
    fn = next_token_fn(model, chunk=4)
    ids_BxT = jnp.asarray(np.random.default_rng(3).integers(0, V, (B, T)), jnp.int32)
    mask_BxT = jnp.asarray(MASKS["padded"])
    logits_BxTxV = jax.jit(fn)(model.params, ids_BxT, mask_BxT)  # evaluation: the model's logits
    np.testing.assert_array_equal(logits_BxTxV, jax.jit(model.fn)(model.params, ids_BxT, mask_BxT))
    targets_BxT = jnp.roll(ids_BxT, -1, axis=1)
    logp = jax.jit(fn, static_argnums=4)
    _close(logp(model.params, ids_BxT, mask_BxT, targets_BxT, True),
           logp(model.params, ids_BxT, mask_BxT, targets_BxT, False))
    batch = {"input_ids": ids_BxT, "attention_mask": mask_BxT}
    chunked = lambda p: training_loss(lambda *a: fn(p, *a), batch)[0]
    plain = lambda p: next_token_loss(fn(p, ids_BxT, mask_BxT), ids_BxT, mask_BxT)
    _close(jax.jit(jax.value_and_grad(chunked))(model.params),
           jax.jit(jax.value_and_grad(plain))(model.params))


@pytest.mark.parametrize("vocab", [32_000, 128_256])
def test_chunked_gradient_needs_a_fraction_of_the_plain_temporaries(vocab):
    """Compiled on CPU, nothing allocated: B x T = 4 x 512, D = 64, the default chunk."""
    sds = jax.ShapeDtypeStruct
    Bm, Tm, D = 4, 512, 64
    args = (sds((Bm, Tm, D), jnp.float32), sds((D, vocab), jnp.float32),
            sds((Bm, Tm), jnp.int32), sds((Bm, Tm), jnp.float32))

    def plain(h, w, targets, weight):
        logits_BxTxV = head_logits(h, w, False)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp_BxTxV, targets[..., None], axis=-1)[..., 0] * weight)

    def chunked(h, w, targets, weight):
        return -jnp.sum(chunked_target_logp(h, w, False, targets) * weight)

    def temp_bytes(loss):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one_logits = Bm * Tm * vocab * 4
    plain_bytes, chunked_bytes = temp_bytes(plain), temp_bytes(chunked)
    assert plain_bytes >= one_logits  # the plain gradient holds at least one fp32 [B,T,V]
    assert chunked_bytes < plain_bytes / 4 and chunked_bytes < one_logits


def test_bad_chunk_and_encoders_are_refused():
    h_BxTxD, w = jnp.zeros((1, 4, 8)), jnp.zeros((8, 5))
    with pytest.raises(LoraError, match=r"^chunk=0; expected a positive number of sequence positions$"):
        chunked_target_logp(h_BxTxD, w, False, jnp.zeros((1, 4), jnp.int32), 0)
    encoder = type("Loaded", (), {"family": "bert"})()
    with pytest.raises(LoraError, match=r"needs a Llama-family decoder; this model is bert$"):
        next_token_fn(encoder)
