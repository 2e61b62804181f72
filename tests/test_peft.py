"""PEFT round trips with the real `peft` package: our adapters load there, theirs load here."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="PEFT parity needs torch (pip install .[parity])")
transformers = pytest.importorskip("transformers", reason="PEFT parity needs transformers")
peft = pytest.importorskip("peft", reason="PEFT parity needs peft (pip install .[parity])")

import lora_jax  # noqa: E402
import lora_jax.models as M  # noqa: E402
from lora_jax import peft as lpeft  # noqa: E402

pytestmark = pytest.mark.parity
ATOL = 1e-4  # fp32, fixed once
IDS = np.random.default_rng(0).integers(2, 96, size=(2, 10)).astype(np.int32)
MASK = np.ones_like(IDS)
CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", CFG),
    "bert": ("BertModel", "BertConfig", {k: v for k, v in CFG.items() if k != "num_key_value_heads"}),
}


def _torch_out(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(MASK))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.fixture(scope="module", params=list(ARCHS))
def base(request, tmp_path_factory):
    arch, cfg_cls, kwargs = ARCHS[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(getattr(transformers, cfg_cls)(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if gain else 0.0))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, directory


ALL_LINEAR = {
    "llama": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
    "bert": r".*/(query|key|value|attention/output/dense|intermediate/dense|\d+/output/dense)/kernel",
}


def _trained_adapters(ours, scaling="standard", targets=None):
    """A few real optimizer steps, so A and B are both non-trivial."""
    targets = targets or lora_jax.models.DEFAULT_TARGETS[ours.family]
    spec = lora_jax.LoraSpec(targets=targets, rank=4, alpha=8.0, scaling=scaling)
    ad = lora_jax.init(jax.random.key(0), ours.fn, ours.params, IDS, MASK, spec=spec)
    tx = optax.adam(0.05)
    opt = tx.init(ad)
    loss = lambda a: jnp.mean(jnp.tanh(lora_jax.apply(ours.fn, ours.params, a, IDS, MASK)) ** 2)
    for _ in range(3):
        g = jax.grad(loss)(ad)
        upd, opt = tx.update(g, opt, ad)
        ad = optax.apply_updates(ad, upd)
    return ad


@pytest.mark.parametrize("scaling, targets", [("standard", "default"), ("rslora", "default"),
                                               ("standard", "all linear")])
def test_our_adapter_loads_in_peft_and_matches(base, tmp_path, scaling, targets):
    name, directory = base
    ours = M.load(directory)
    ad = _trained_adapters(ours, scaling, ALL_LINEAR[name] if targets == "all linear" else None)
    with pytest.warns(UserWarning, match="vLLM cannot serve ranks \\[4\\]"):
        lpeft.save_adapter(tmp_path / "ad", ad, ours, rslora=scaling == "rslora")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["use_rslora"] == (scaling == "rslora")
    arch = ARCHS[name][0]
    theirs = peft.PeftModel.from_pretrained(getattr(transformers, arch).from_pretrained(directory),
                                            tmp_path / "ad").eval()
    expected = np.asarray(lora_jax.apply(ours.fn, ours.params, ad, IDS, MASK))
    assert np.abs(expected - np.asarray(ours.fn(ours.params, IDS, MASK))).max() > 1e-3
    np.testing.assert_allclose(_torch_out(theirs), expected, atol=ATOL, rtol=0)


def test_peft_trained_adapter_loads_here_and_matches(base, tmp_path):
    name, directory = base
    arch = ARCHS[name][0]
    model = getattr(transformers, arch).from_pretrained(directory)
    targets = ["q_proj", "v_proj"] if name == "llama" else ["query", "value"]
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, rank_pattern={"v_proj": 2, "value": 2})
    pm = peft.get_peft_model(model, cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):  # train in PEFT, so B is not zero
        opt.zero_grad()
        out = pm(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK))
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).tanh().pow(2).mean().backward()
        opt.step()
    pm.eval().save_pretrained(tmp_path / "theirs")
    for scan in (False, True):
        ours = M.load(directory, scan_layers=scan)
        ad = lpeft.load_adapter(tmp_path / "theirs", ours)
        np.testing.assert_allclose(np.asarray(lora_jax.apply(ours.fn, ours.params, ad, IDS, MASK)),
                                   _torch_out(pm), atol=ATOL, rtol=0)


def test_merged_export_loads_in_transformers_and_matches(base, tmp_path):
    name, directory = base
    ours = M.load(directory)
    ad = _trained_adapters(ours)
    M.save_pretrained(ours, lora_jax.merge(ours.params, ad), tmp_path / "merged")
    theirs = getattr(transformers, ARCHS[name][0]).from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_torch_out(theirs),
                               np.asarray(lora_jax.apply(ours.fn, ours.params, ad, IDS, MASK)),
                               atol=ATOL, rtol=0)


def test_adapter_for_another_base_is_refused_naming_the_mismatch(base, tmp_path):
    name, directory = base
    ours = M.load(directory)
    lpeft.save_adapter(tmp_path / "ad", _trained_adapters(ours), ours)
    other_cfg = dict(ARCHS[name][2], hidden_size=32, intermediate_size=48)
    if name == "bert":
        other_cfg.pop("num_key_value_heads", None)
    other = getattr(transformers, ARCHS[name][0])(getattr(transformers, ARCHS[name][1])(**other_cfg))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(lora_jax.LoraError, match=r"has lora_A \(4, 64\), lora_B \(\d+, 4\), which do "
                                                 r"not fit the weight \(32, \d+\) of this model"):
        lpeft.load_adapter(tmp_path / "ad", M.load(tmp_path / "other"))


def test_pickle_adapter_is_refused(base, tmp_path):
    _, directory = base
    (tmp_path / "bin").mkdir()
    shutil.copy(__file__, tmp_path / "bin" / "adapter_model.bin")
    (tmp_path / "bin" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(lora_jax.LoraError, match=r"only a pickle adapter .* pickle files are not loaded"):
        lpeft.load_adapter(tmp_path / "bin", M.load(directory))
