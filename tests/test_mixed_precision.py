"""bf16 models: the LoRA branch runs in the activations' dtype; attention kernel selection."""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
import pytest

import lora_jax
import lora_jax.models as M
from lora_jax.errors import LoraError
from lora_jax.interpreter import _scan_counts
from lora_jax.models import loading

LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-5, max_position_embeddings=64, hidden_act="silu",
)
BERT = dict(
    architectures=["BertModel"], model_type="bert", vocab_size=64, hidden_size=32,
    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
    type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)
TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
IDS = jnp.array([[5, 9, 3, 7, 2, 8], [4, 4, 11, 1, 6, 3]], jnp.int32)
MASK = jnp.ones_like(IDS)


def _dot_dtypes(jaxpr) -> set[tuple[str, ...]]:
    """(lhs, rhs) dtypes of every dot_general, nested jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jex.core.jaxprs_in_params(eqn.params):
            found |= _dot_dtypes(sub)
    return found


@pytest.mark.parametrize("scan", [False, True])
def test_bf16_model_runs_every_matmul_in_bf16_with_fp32_adapter_grads(scan):
    m = M.from_config(LLAMA, seed=0, dtype=jnp.bfloat16, scan_layers=scan)
    spec = lora_jax.LoraSpec(targets=TARGETS, rank=4, alpha=8.0)
    ad = lora_jax.init(jax.random.key(1), m.fn, m.params, IDS, MASK, spec=spec)
    ad = jax.tree.map(lambda x: x + 0.01, ad)  # B != 0, so the branch matters

    def loss(ad):
        return lora_jax.apply(m.fn, m.params, ad, IDS, MASK).astype(jnp.float32).mean()

    jaxpr = jax.make_jaxpr(lambda ad: lora_jax.apply(m.fn, m.params, ad, IDS, MASK))(ad)
    assert _dot_dtypes(jaxpr.jaxpr) == {("bfloat16", "bfloat16")}
    assert jaxpr.out_avals[0].dtype == jnp.bfloat16
    grads = jax.grad(loss)(ad)
    leaves = jax.tree.leaves(grads)
    assert {str(g.dtype) for g in leaves} == {"float32"}
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert max(float(jnp.abs(g).max()) for g in leaves) > 0


def test_fp32_model_branch_stays_fp32():
    m = M.from_config(LLAMA, seed=0)
    spec = lora_jax.LoraSpec(targets=TARGETS, rank=4, alpha=8.0)
    ad = lora_jax.init(jax.random.key(1), m.fn, m.params, IDS, MASK, spec=spec)
    jaxpr = jax.make_jaxpr(lambda ad: lora_jax.apply(m.fn, m.params, ad, IDS, MASK))(ad)
    assert _dot_dtypes(jaxpr.jaxpr) == {("float32", "float32")}


def test_unknown_attention_kernel_is_one_line_error():
    with pytest.raises(LoraError, match=r"attention 'flash' is not one of \('auto', 'xla', 'cudnn'\)"):
        M.from_config(LLAMA, attention="flash")


@pytest.fixture
def nvidia(monkeypatch):
    """Pretend this process runs on an NVIDIA GPU: the kernel choice, not the kernel, is tested."""
    monkeypatch.setattr(loading, "on_nvidia_gpu", lambda: True)


def test_auto_attention_picks_cudnn_only_on_an_nvidia_gpu_in_bf16(nvidia, monkeypatch):
    assert M.from_config(LLAMA, dtype=jnp.bfloat16).config.attention == "cudnn"
    assert M.from_config(LLAMA, dtype=jnp.float16).config.attention == "cudnn"
    assert M.from_config(LLAMA).config.attention == "xla"  # float32 weights
    assert M.from_config(BERT, dtype=jnp.bfloat16).config is not None  # encoders: XLA, no error
    monkeypatch.setattr(loading, "on_nvidia_gpu", lambda: False)
    assert M.from_config(LLAMA, dtype=jnp.bfloat16).config.attention == "xla"


def test_auto_is_xla_on_this_cpu_and_explicit_cudnn_is_refused_here():
    assert not loading.on_nvidia_gpu()
    assert M.from_config(LLAMA, dtype=jnp.bfloat16).config.attention == "xla"
    with pytest.raises(LoraError, match=r"^attention 'cudnn' needs an NVIDIA GPU; this process runs on cpu"):
        M.from_config(LLAMA, dtype=jnp.bfloat16, attention="cudnn")


def test_cudnn_attention_refuses_fp32_and_shares_params(nvidia):
    with pytest.raises(LoraError, match=r"^attention 'cudnn' needs bfloat16 or float16 weights, got float32"):
        M.from_config(LLAMA, seed=3, attention="cudnn")
    xla = M.from_config(LLAMA, seed=3, dtype=jnp.bfloat16, attention="xla")
    fused = M.from_config(LLAMA, seed=3, dtype=jnp.bfloat16, attention="cudnn")
    assert fused.config.attention == "cudnn"
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), xla.params, fused.params))
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), fused.params)
    with pytest.raises(LoraError, match="attention='cudnn' needs bfloat16 or float16 activations"):
        fused.fn(f32, IDS, MASK)


class _Groups:
    def __init__(self, *groups):
        self.groups = groups

    def unpack(self):
        return self.groups


def test_scan_counts_reads_old_and_new_jax_params():
    assert _scan_counts({"num_consts": 2, "num_carry": 1}) == (2, 1)
    assert _scan_counts({"ft_in": _Groups((None,) * 3, (None,) * 2, (None,))}) == (3, 2)


def test_load_selects_the_kernel_for_llama_and_refuses_it_for_bert(tmp_path, nvidia):
    llama = M.from_config(LLAMA, seed=4, dtype=jnp.bfloat16)
    M.save_pretrained(llama, llama.params, tmp_path / "llama")
    fused = M.load(tmp_path / "llama", attention="cudnn")  # bf16 as stored (config.json's dtype)
    assert fused.config.attention == "cudnn"
    assert M.load(tmp_path / "llama").config.attention == "cudnn"  # auto, the default
    assert M.load(tmp_path / "llama", dtype=jnp.float32).config.attention == "xla"
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), llama.params, fused.params))
    bert = M.from_config(BERT, seed=4)
    M.save_pretrained(bert, bert.params, tmp_path / "bert")
    with pytest.raises(LoraError, match="attention 'cudnn' is selectable for Llama-family models only"):
        M.load(tmp_path / "bert", attention="cudnn")


def _dots_with_shapes(jaxpr, out):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append([(str(v.aval.dtype), v.aval.size) for v in eqn.invars])
        for sub in jex.core.jaxprs_in_params(eqn.params):
            _dots_with_shapes(sub, out)
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_bf16_train_step_has_no_fp32_matmul_of_activation_or_weight_size(scan):
    """The whole step (forward, backward, chunked LM loss, AdamW) of a bf16 Llama with LoRA on
    every linear layer: a matmul may take an fp32 operand only if it is smaller than both the
    smallest activation [B,T,D] and the smallest frozen weight (adapter-sized work)."""
    from types import SimpleNamespace

    from lora_jax.models.lm_loss import next_token_fn
    from lora_jax.tasks.causal_lm import training_loss
    from lora_jax.train_step import TrainState, make_optimizer, make_train_step, model_apply

    m = M.from_config(LLAMA, seed=0, dtype=jnp.bfloat16, scan_layers=scan, remat=scan)
    fn = next_token_fn(m)
    ids = jnp.ones((2, 32), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    spec = lora_jax.LoraSpec(targets=TARGETS, rank=4, alpha=8.0)
    trainable = {"adapters": lora_jax.init(jax.random.key(1), fn, m.params, ids, batch["attention_mask"],
                                           spec=spec), "extra": {}}
    opt = SimpleNamespace(lr=1e-3, warmup_steps=1, end_lr_ratio=0.0, weight_decay=0.0, clip_norm=1.0,
                          b1=0.9, b2=0.999, loraplus_ratio=1.0)
    tx, schedule = make_optimizer(opt, 10)
    state = TrainState(step=jnp.int32(0), trainable=trainable, frozen=m.params,
                       opt_state=tx.init(trainable), rng=jax.random.key(0))
    step = make_train_step(model_apply("lora", fn), training_loss, tx, schedule, 1, use_rng=False)
    dots = _dots_with_shapes(jax.make_jaxpr(step)(state, batch).jaxpr, [])
    bound = min(ids.size * LLAMA["hidden_size"],
                min(x.size for x in jax.tree.leaves(m.params) if x.ndim >= 2))
    assert len(dots) > 20  # the step's matmuls were found
    big_fp32 = [d for d in dots if any(t == "float32" and n >= bound for t, n in d)]
    assert not big_fp32, big_fp32
