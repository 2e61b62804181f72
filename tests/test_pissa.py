"""PiSSA and OLoRA against the real PEFT: the same initial factors and residual, zero change at
init, the rank-2r export loading in PEFT on the ORIGINAL base, and the main job's option."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import zoo
from safetensors.numpy import load_file

import lora_jax
import lora_jax.models as M
from configs import planted
from lora_jax import peft as lpeft
from lora_jax import run_export
from lora_jax import sharding as shd
from lora_jax.config_check import check_config
from lora_jax.quant.tree import quantize_params
from lora_jax.trainer import train_and_evaluate

torch = pytest.importorskip("torch", reason="PEFT parity needs torch (pip install .[parity])")
transformers = pytest.importorskip("transformers", reason="PEFT parity needs transformers")
peft = pytest.importorskip("peft", reason="PEFT parity needs peft (pip install .[parity])")

ATOL = 1e-4  # fp32, torch vs XLA; fixed once
ZERO_ATOL = 1e-5  # residual + initial adapter against the base, fp32; fixed once
RANK, ALPHA = 8, 4.0  # s = 0.5: PiSSA's S/s and OLoRA's undivided factors both show
MODULES = ["q_proj", "v_proj", "o_proj"]  # v_proj: 64 -> 32 (GQA), not square
TARGETS = r".*/(q_proj|v_proj|o_proj)/kernel"
IDS = np.random.default_rng(0).integers(2, 96, size=(2, 10)).astype(np.int32)
MASK = np.ones_like(IDS)
LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if gain else 0.0))
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return directory


def _torch_logits(model):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK))
    return out.logits.numpy()


def _peft_model(llama_dir, init):
    base = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=MODULES, init_lora_weights=init)
    return peft.get_peft_model(base, cfg).eval()


def _init(model, init):
    spec = lora_jax.LoraSpec(targets=TARGETS, rank=RANK, alpha=ALPHA, init=init)
    return lora_jax.init(jax.random.key(0), model.fn, model.params, IDS, MASK, spec=spec)


@pytest.fixture(scope="module")
def ours(llama_dir):
    """(our model of llama_dir, {init: its initial adapters}, its jitted forward) made once."""
    model = M.load(llama_dir)
    return model, {init: _init(model, init) for init in ("pissa", "olora", "pissa_niter_4")}, _forward(model)


def _forward(model):
    """Our logits on IDS, jitted: forward(params) or forward(params, adapters)."""
    run = lambda p, a: model.fn(p, IDS, MASK) if a is None else lora_jax.apply(model.fn, p, a, IDS, MASK)
    jitted = jax.jit(run)
    return lambda params, adapters=None: np.asarray(jitted(params, adapters))


def _peft_tensors(directory, adapters, model):
    lpeft.save_adapter(directory, adapters, model)
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_initial_factors_and_residual_equal_peft(llama_dir, ours, tmp_path, init):
    pm = _peft_model(llama_dir, init)
    theirs = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    model, ad, forward = ours[0], ours[1][init], ours[2]
    mine = _peft_tensors(tmp_path / "ours", ad, model)
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * 2 * len(MODULES)
    for key in (k for k in mine if ".lora_A." in k):
        b_key = key.replace(".lora_A.", ".lora_B.")
        sign = np.sign(np.sum(mine[key] * theirs[key], axis=1))  # per rank component, [r]
        assert np.all(sign != 0)
        np.testing.assert_allclose(mine[key] * sign[:, None], theirs[key], atol=ATOL, rtol=0)
        np.testing.assert_allclose(mine[b_key] * sign[None, :], theirs[b_key], atol=ATOL, rtol=0)
    residual = lora_jax.residual_base(model.params, ad)
    with pm.disable_adapter():  # PEFT's mutated base alone
        np.testing.assert_allclose(forward(residual), _torch_logits(pm),
                                   atol=ATOL, rtol=0)
    base_logits = forward(model.params)
    assert np.abs(forward(residual) - base_logits).max() > 1e-2
    np.testing.assert_allclose(forward(residual, ad),
                               base_logits, atol=ZERO_ATOL, rtol=0)


def test_pissa_niter_captures_the_top_subspace_as_peft_does(llama_dir, ours):
    pm = _peft_model(llama_dir, "pissa_niter_4")
    model, ad, exact = ours[0], ours[1]["pissa_niter_4"], ours[1]["pissa"]
    flat_w = dict(lora_jax.paths.flat_paths(model.params))
    for (path, a), (_, e) in zip(lora_jax.adapters.adapter_items(ad), lora_jax.adapters.adapter_items(exact),
                                 strict=True):
        w = np.asarray(flat_w[path])
        best = np.linalg.norm(w - np.asarray(e.delta()))
        found = np.linalg.norm(w - np.asarray(a.delta()))
        assert best <= found <= 1.05 * best  # randomised: near the best rank-r residual, never below
    # PEFT's residual of the same modules is as close to the best (its randomness is torch's)
    for layer in pm.base_model.model.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            w = mod.base_layer.weight.detach().numpy()  # W_res
            full = w + mod.scaling["default"] * (mod.lora_B["default"].weight @ mod.lora_A["default"].weight
                                                 ).detach().numpy()
            best = np.sqrt(np.sum(np.linalg.svd(full, compute_uv=False)[RANK:] ** 2))
            assert best <= np.linalg.norm(w) <= 1.05 * best


def test_zero_change_at_init_and_params_untouched():
    c = zoo.scanned()  # scanned blocks with multi-axis DenseGeneral kernels
    before = jax.tree.map(np.array, c.params)
    fn = jax.jit(lambda p: c.fn(p, *c.args))
    adapted = jax.jit(lambda p, a: lora_jax.apply(c.fn, p, a, *c.args))
    for init in ("pissa", "pissa_niter_2", "olora"):
        spec = lora_jax.LoraSpec(targets=c.targets, rank=2, alpha=3.0, init=init)
        ad = lora_jax.init(jax.random.key(0), c.fn, c.params, *c.args, spec=spec)
        residual = lora_jax.residual_base(c.params, ad)
        base = np.asarray(fn(c.params))
        assert np.abs(np.asarray(fn(residual)) - base).max() > 1e-2
        np.testing.assert_allclose(np.asarray(adapted(residual, ad)), base, atol=ZERO_ATOL, rtol=0)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, c.params))


def test_export_after_training_loads_in_peft_on_the_original_base(llama_dir, tmp_path):
    model = M.load(llama_dir, scan_layers=True)  # scanned: per-layer SVD, per-layer export
    initial = _init(model, "pissa")
    residual = lora_jax.residual_base(model.params, initial)
    trained = jax.tree.map(lambda x, z: x + 0.05 * z, initial, zoo.randomize(initial, seed=3, scale=1.0))
    forward = lambda p, a=None: np.asarray(  # eager: three adapter shapes, one call each
        model.fn(p, IDS, MASK) if a is None else lora_jax.apply(model.fn, p, a, IDS, MASK))
    expected = forward(residual, trained)
    assert np.abs(expected - forward(model.params)).max() > 1e-2
    plain = lora_jax.to_plain_lora(trained, initial)
    np.testing.assert_allclose(forward(model.params, plain), expected, atol=ATOL, rtol=0)
    lpeft.save_adapter(tmp_path / "plain", plain, model)
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (2 * RANK, 2 * ALPHA, True)
    base = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()  # the ORIGINAL weights
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "plain").eval()
    np.testing.assert_allclose(_torch_logits(theirs), expected, atol=ATOL, rtol=0)


def _planted(**overrides):
    c = planted.get_config("smoke")
    c.planted_rank.width = 32
    c.steps, c.ckpt_every, c.log_every = 4, 2, 2
    c.optimizer.warmup_steps = 1
    c.update_from_flattened_dict({"lora.init": "pissa", **overrides})
    return c


def test_main_job_trains_on_the_residual_checkpoints_a0_b0_and_exports_rank_2r(tmp_path):
    res = train_and_evaluate(_planted(), str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "eval/mse" in r)
    assert abs(first["eval/mse"] - first["eval/base_mse"]) <= 1e-6 * first["eval/base_mse"]  # zero change
    adapters, _ = lora_jax.adapter_io.load_adapter(str(tmp_path / "adapter"))
    rank = planted.get_config().lora.rank
    assert {ad.rank for _, ad in lora_jax.adapters.adapter_items(adapters)} == {2 * rank}
    ckpt = tmp_path / "ckpt" / "4" / "state"
    names = os.listdir(ckpt)  # A₀, B₀ beside the trainable tree; no base weight is ever saved
    assert any(n.startswith("initial.") for n in names)
    orbax = ("array_metadatas", "commit_success")  # Orbax's own records
    assert all(n.split(".")[0] in ("trainable", "opt_state", "step", "initial", *orbax) or n[0] == "_"
               for n in names), names
    # `experiments.export` reads an unfinished run's checkpoint into the same rank-2r form
    config = run_export.load_run_config(str(tmp_path))
    mesh, task = run_export._one_device_task(config, str(tmp_path))
    from_ckpt, step = run_export._from_checkpoint(str(tmp_path), config, task, run_export._abstract_trainable(
        config, task), shd.replicated(mesh))
    assert step == 4
    for x, y in zip(jax.tree.leaves(from_ckpt["adapters"]), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Killed after step 2: the resume rebuilds the residual from the checkpoint's A₀, B₀.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path, resumed, ignore=shutil.ignore_patterns("4", "adapter*", "peft", "resumed"))
    again = train_and_evaluate(_planted(), str(resumed))
    assert again["start_step"] == 2
    for x, y in zip(jax.tree.leaves(again["trainable"]), jax.tree.leaves(res["trainable"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    ({"method": "full"}, r"^lora.init='pissa'; expected 'kaiming' or 'gaussian' with method='full'"),
    ({"model.quant": "nf4", "lora.init": "olora"},
     r"^lora.init='olora'; expected 'kaiming' or 'gaussian' with model.quant='nf4'"),
    ({"lora.init": "pissa_niter_x"}, r"^lora.init='pissa_niter_x'; expected one of 'kaiming', "),
])
def test_bad_combinations_are_one_clear_error(tmp_path, overrides, message):
    c = _planted(**overrides)
    with pytest.raises(lora_jax.LoraError, match=message):
        check_config(c, str(tmp_path / "w"))


def test_library_refusals_are_one_line():
    c = zoo.plain_mlp()
    with pytest.raises(lora_jax.LoraError, match=r"^init='pissa_niter_'; expected one of"):
        lora_jax.LoraSpec(targets=c.targets, init="pissa_niter_")
    with pytest.raises(lora_jax.LoraError, match=r"^init='olora' with dora=True is not supported"):
        lora_jax.LoraSpec(targets=c.targets, init="olora", dora=True)
    q = quantize_params(c.params, r"w1", "int8")
    spec = lora_jax.LoraSpec(targets=r"w1", rank=2, init="pissa")
    with pytest.raises(lora_jax.LoraError, match=r"needs the dense weight of 'w1', which is quantised"):
        lora_jax.init(jax.random.key(0), c.fn, q, *c.args, spec=spec)
    ad = lora_jax.init(jax.random.key(0), c.fn, c.params, *c.args, spec=spec)
    other = {"w1": dataclasses.replace(ad["w1"], scale=2 * ad["w1"].scale)}
    with pytest.raises(lora_jax.LoraError, match=r"initial adapter of 'w1' has another scale, layout"):
        lora_jax.to_plain_lora(ad, other)
    back = lora_jax.merge(lora_jax.residual_base(c.params, ad), ad)["w1"]
    np.testing.assert_allclose(np.asarray(back), np.asarray(c.params["w1"]), atol=ZERO_ATOL, rtol=0)


def test_main_job_refuses_a_weight_both_trained_in_full_and_adapted_from_its_residual(tmp_path):
    c = _planted(**{"lora.train_also": "layers_1/kernel"})
    with pytest.raises(lora_jax.LoraError, match=r"^lora.train_also 'layers_1/kernel' matches "
                                                 r"'layers_1/kernel', which lora.init='pissa' also adapts"):
        train_and_evaluate(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
