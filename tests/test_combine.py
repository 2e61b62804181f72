"""Adapter strength and combination: each mode checked against the ΔW it promises, and PEFT."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import lora_jax
from lora_jax.adapters import Adapter, adapter_items
from lora_jax.combine import combine, scaled_b, with_strength

NAMES = ["plain_mlp", "conv_net", "tied_embedding", "scanned", "nnx_mlp"]  # scanned: linen_block, stacked


@functools.cache
def _case(name):
    return zoo.CASES[name]()


@functools.cache  # init + randomize cost seconds per case; tests only read the adapters
def _adapters(name, rank, seed, alpha=4.0, targets=None):
    case = _case(name)
    spec = lora_jax.LoraSpec(targets=targets or case.targets, rank=rank, alpha=alpha)
    ad = lora_jax.init(jax.random.key(seed), case.fn, case.params, *case.args, spec=spec)
    return zoo.randomize(ad, seed=seed)


def _deltas(adapters):
    return {p: np.asarray(ad.delta()) for p, ad in adapter_items(adapters)}


def _weighted(trees, weights):
    per = [_deltas(t) for t in trees]
    return {p: sum(w * d[p] for w, d in zip(weights, per)) for p in per[0]}


def _close(x, y, tol):
    for p in x:
        np.testing.assert_allclose(x[p], y[p], atol=tol, rtol=tol, err_msg=p)


def _run(case, adapters):
    return np.asarray(lora_jax.apply(case.fn, case.params, adapters, *case.args))


@pytest.mark.parametrize("name", NAMES)
def test_cat_is_applying_both(name):
    case = _case(name)
    a1, a2 = _adapters(name, 2, 1), _adapters(name, 2, 2, alpha=3.0)
    both = combine([a1, a2], [1.0, 1.0], how="cat")
    assert all(ad.rank == 4 and ad.scale == 1.0 for _, ad in adapter_items(both))
    ref = np.asarray(case.fn(lora_jax.merge(lora_jax.merge(case.params, a1), a2), *case.args))
    assert np.abs(ref - np.asarray(case.fn(case.params, *case.args))).max() > 1e-2
    np.testing.assert_allclose(_run(case, both), ref, atol=1e-5, rtol=1e-5)
    _close(_deltas(combine([a1, a2], [0.5, -2.0], how="cat")), _weighted([a1, a2], [0.5, -2.0]), 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_linear_self_minus_self_is_base(name):
    case = _case(name)
    a = _adapters(name, 2, 1)
    out = _run(case, combine([a, a], [1.0, -1.0], how="linear"))
    np.testing.assert_allclose(out, np.asarray(case.fn(case.params, *case.args)), atol=1e-5, rtol=1e-5)
    # one adapter (no cross terms): linear is exactly w·ΔW, even for negative w
    _close(_deltas(combine([a], [-0.6], how="linear")), _weighted([a], [-0.6]), 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_svd_reproduces_weighted_sum(name):
    """svd at rank >= rank(Σ w_i·ΔW_i) is exact: it equals Σ w_i·ΔW_i (= cat's ΔW).

    It does not equal linear's ΔW, which carries cross terms A_i·B_j (see test_linear_vs_peft).
    """
    case = _case(name)
    a1, a2 = _adapters(name, 2, 1), _adapters(name, 2, 2, alpha=3.0)
    alone = combine([a1], [1.0], how="svd")  # default rank = a1's rank: exact
    assert all(ad.scale == 1.0 and ad.rank == 2 for _, ad in adapter_items(alone))
    _close(_deltas(alone), _deltas(a1), 1e-4)
    full = combine([a1, a2], [0.7, -1.3], how="svd", rank=4)
    _close(_deltas(full), _weighted([a1, a2], [0.7, -1.3]), 1e-4)
    _close(_deltas(full), _deltas(combine([a1, a2], [0.7, -1.3], how="cat")), 1e-4)
    ref = case.fn(lora_jax.merge(case.params, combine([a1, a2], [0.7, -1.3], how="cat")), *case.args)
    np.testing.assert_allclose(_run(case, full), np.asarray(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["plain_mlp", "scanned"])
def test_svd_at_full_rank_reproduces_linear_where_linear_is_a_weighted_update(name):
    """For one adapter at any weight, PEFT's factor-wise `linear` is exactly w·ΔW (no cross
    terms), and `svd` at full rank gives the same ΔW and the same outputs."""
    case = _case(name)
    a = _adapters(name, 2, 3)
    for w in (0.6, -1.4):
        lin, svd = combine([a], [w], how="linear"), combine([a], [w], how="svd")
        _close(_deltas(svd), _deltas(lin), 1e-4)
        np.testing.assert_allclose(_run(case, svd), _run(case, lin), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["plain_mlp", "scanned"])
def test_svd_truncation_is_optimal_per_stack_index(name):
    """Eckart–Young: the rank-1 result misses by exactly the 2nd singular value of each matrix."""
    a = _adapters(name, 2, 1)
    one = dict(adapter_items(combine([a], [1.0], how="svd", rank=1)))
    for path, ad in adapter_items(a):
        n = len(ad.stack)
        lead = tuple(ad.a.shape[:n]) + (int(np.prod(ad.a.shape[n:-1])), -1)
        mat = lambda x, ad=ad, lead=lead: np.asarray(
            jnp.transpose(x.delta(), ad.stack + ad.inputs + ad.outputs)).reshape(lead)
        s = np.linalg.svd(mat(ad), compute_uv=False)
        err = np.linalg.norm(mat(ad) - mat(one[path]), ord=2, axis=(-2, -1))
        np.testing.assert_allclose(err, s[..., 1], rtol=1e-4, atol=1e-5, err_msg=path)
        assert one[path].rank == 1 and s[..., 1].min() > 1e-3


@pytest.mark.parametrize("scaler", [with_strength, scaled_b])
@pytest.mark.parametrize("name", ["plain_mlp", "scanned"])
def test_strength(scaler, name):
    case = _case(name)
    a = _adapters(name, 2, 1)
    base = np.asarray(case.fn(case.params, *case.args))
    np.testing.assert_allclose(_run(case, scaler(a, 0.0)), base, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_run(case, scaler(a, 1.0)), _run(case, a), atol=1e-6, rtol=0)
    half = scaler(a, 0.5)
    _close(_deltas(half), _weighted([a], [0.5]), 1e-6)
    ref = np.asarray(case.fn(lora_jax.merge(case.params, half), *case.args))
    np.testing.assert_allclose(_run(case, half), ref, atol=1e-5, rtol=1e-5)
    assert np.abs(_run(case, half) - base).max() > 1e-3


def test_with_strength_retraces_but_scaled_b_does_not():
    case = _case("plain_mlp")
    a = _adapters("plain_mlp", 2, 1)
    traces = []

    @jax.jit
    def f(ad):
        traces.append(1)
        return lora_jax.apply(case.fn, case.params, ad, *case.args)

    f(scaled_b(a, jnp.float32(0.3)))
    f(scaled_b(a, jnp.float32(0.6)))
    assert len(traces) == 1
    f(with_strength(a, 0.3))
    f(with_strength(a, 0.6))
    assert len(traces) == 3


def test_linear_cat_svd_match_peft():
    """Same adapters loaded into PEFT's LoRA on an equivalent torch MLP; ΔW compared per weight."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    trees = {"default": _adapters("plain_mlp", 2, 1), "b": _adapters("plain_mlp", 2, 2, alpha=2.0),
             "c": _adapters("plain_mlp", 1, 2, alpha=3.0)}

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, (n_in, n_out) in enumerate([(5, 12), (12, 12), (12, 2)]):
                setattr(self, f"w{i}", torch.nn.Linear(n_in, n_out, bias=False))

    model = None
    for name, tree in trees.items():
        ad0 = tree["w0"]
        cfg = peft.LoraConfig(r=ad0.rank, lora_alpha=ad0.scale * ad0.rank, target_modules=["w0", "w1", "w2"])
        if model is None:
            model = peft.get_peft_model(MLP(), cfg)
        else:
            model.add_adapter(name, cfg)
        for path, ad in adapter_items(tree):
            layer = getattr(model.base_model.model, path)
            layer.lora_A[name].weight.data = torch.tensor(np.asarray(ad.a).T.copy())
            layer.lora_B[name].weight.data = torch.tensor(np.asarray(ad.b).T.copy())
    for how, names, ws in (("linear", ["default", "b"], [0.7, -1.5]), ("cat", ["default", "c"], [0.7, -1.5]),
                           ("svd", ["default", "c"], [0.7, -1.5])):
        model.add_weighted_adapter(names, ws, f"{how}_mix", combination_type=how)
        ours = _deltas(combine([trees[n] for n in names], ws, how=how))
        for path, d in ours.items():
            theirs = getattr(model.base_model.model, path).get_delta_weight(f"{how}_mix")
            np.testing.assert_allclose(d, theirs.detach().numpy().T, atol=1e-5, rtol=1e-4,
                                       err_msg=f"{how} {path}")
    lin, exact = _deltas(combine([trees["default"], trees["b"]], ws, how="linear")), _weighted(
        [trees["default"], trees["b"]], ws)
    assert max(np.abs(lin[p] - exact[p]).max() for p in lin) > 1e-2  # linear has cross terms


def test_errors():
    a, r1 = _adapters("plain_mlp", 2, 1), _adapters("plain_mlp", 1, 2, alpha=3.0)
    fewer = _adapters("plain_mlp", 2, 1, targets=r"w[01]")
    transposed = {**a, "w1": dataclasses.replace(a["w1"], inputs=(1,), outputs=(0,))}
    z = jnp.zeros
    wrong_shape = {**a, "w0": Adapter(z((6, 2)), z((2, 12)), 1.0, (), (0,), (1,))}
    cases = [
        (lambda: combine([], []), "empty list"),
        (lambda: combine([a, a], [1.0]), "1 weights for 2"),
        (lambda: combine([a], [1.0], how="ties"), "unknown combination"),
        (lambda: combine([a, fewer], [1.0, 1.0], how="cat"), "lacks 'w2'"),
        (lambda: combine([fewer, a], [1.0, 1.0], how="cat"), "has extra 'w2'"),
        (lambda: combine([a, transposed], [1.0, 1.0], how="svd"), "lays out 'w1'"),
        (lambda: combine([a, wrong_shape], [1.0, 1.0], how="cat"), "lays out 'w0'"),
        (lambda: combine([a, r1], [1.0, 1.0], how="linear"), "needs equal ranks"),
        (lambda: combine([a], [1.0], how="svd", rank=0), "positive int"),
        (lambda: combine([a], [1.0], how="cat", rank=2), "only for how='svd'"),
        (lambda: combine([{}], [1.0]), "no adapters"),
    ]
    for call, fragment in cases:
        with pytest.raises(lora_jax.LoraError) as e:
            call()
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
