"""The LoRA-paper analyses on matrices whose answers are known exactly or in expectation."""

import dataclasses

import jax
import numpy as np
import pytest
import zoo

import lora_jax
from lora_jax import analysis
from lora_jax.adapter_io import load_adapter, save_adapter
from lora_jax.adapters import Adapter, adapter_items
from lora_jax.paths import nest


def _orthonormal(n, k, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, k)))
    return q


def test_identical_subspaces_have_similarity_one():
    a_NxR = np.random.default_rng(0).standard_normal((32, 6))
    np.testing.assert_allclose(analysis.subspace_similarity_grid(a_NxR, a_NxR), 1.0, atol=1e-10)
    # Same column space, different basis: only the full subspaces (i = j = r) coincide.
    mixed_NxR = a_NxR @ np.random.default_rng(1).standard_normal((6, 6))
    assert analysis.subspace_similarity(a_NxR, mixed_NxR, 6, 6) == pytest.approx(1.0, abs=1e-10)
    assert analysis.subspace_similarity(a_NxR, mixed_NxR, 1, 1) < 0.99


def test_orthogonal_subspaces_have_similarity_zero():
    q_NxK = _orthonormal(32, 10, 0)
    a1, a2 = q_NxK[:, :4] * [4.0, 3.0, 2.0, 1.0], q_NxK[:, 4:]
    grid = analysis.subspace_similarity_grid(a1, a2)
    assert grid.shape == (4, 6)
    np.testing.assert_allclose(grid, 0.0, atol=1e-12)


def test_random_subspaces_match_expected_similarity():
    """E‖U₁ᵢᵀU₂ⱼ‖²_F = i·j/d for independent uniform subspaces, so E φ(i, j) = max(i, j)/d."""
    d, r1, r2, seeds = 64, 8, 16, 30
    grids = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        grids.append(analysis.subspace_similarity_grid(rng.standard_normal((d, r1)),
                                                       rng.standard_normal((d, r2))))
    i = np.arange(1, r1 + 1)[:, None]
    j = np.arange(1, r2 + 1)[None, :]
    expected = np.maximum(i, j) / d
    np.testing.assert_allclose(np.mean(grids, axis=0), expected, atol=0.015)
    assert np.mean(grids) == pytest.approx(np.mean(expected), rel=0.05)


def test_similarity_rejects_bad_indices():
    a = np.ones((8, 2))
    with pytest.raises(ValueError):
        analysis.subspace_similarity(a, a, 3, 1)


def test_amplification_factor_is_exact_for_planted_directions():
    """W = U diag(s) Vᵀ; ΔW on W's singular pairs 5 and 6 ⇒ ‖UᵀWVᵀ‖ = ‖(s₅, s₆)‖ exactly."""
    d_in, d_out, r = 12, 8, 2
    u_IxK, v_OxK = _orthonormal(d_in, d_out, 0), _orthonormal(d_out, d_out, 1)
    s = np.array([10.0, 9.0, 8.0, 7.0, 6.0, 0.5, 0.25, 0.1])
    w_IxO = (u_IxK * s) @ v_OxK.T
    t = np.array([3.0, 2.0])  # ΔW singular values
    idx = [5, 6]
    delta_IxO = (u_IxK[:, idx] * t) @ v_OxK[:, idx].T
    out = analysis.amplification_factor(delta_IxO, w_IxO, r)
    assert out["delta_norm"] == pytest.approx(np.sqrt(13.0))
    assert out["proj_delta"] == pytest.approx(np.sqrt(0.5**2 + 0.25**2))
    assert out["ratio_delta"] == pytest.approx(np.sqrt(13.0) / np.sqrt(0.3125))
    assert out["proj_w"] == pytest.approx(np.sqrt(181.0))  # top-2 of W: 10, 9
    assert out["ratio_w"] == pytest.approx(np.sqrt(13.0 / 181.0))
    # Any r-dim projection is bounded by W's own top-r (Ky Fan); random lies in between here.
    assert out["proj_delta"] < out["proj_random"] < out["proj_w"]
    assert out["ratio_random"] == pytest.approx(out["delta_norm"] / out["proj_random"])
    again = analysis.amplification_factor(delta_IxO, w_IxO, r, seed=0)
    assert again["proj_random"] == out["proj_random"]  # seeded


def test_spectrum_rank_counts_energy_not_singular_values():
    m = np.zeros((6, 5))
    m[[0, 1, 2], [0, 1, 2]] = [1.0, 3.0, 2.0]  # σ = 3, 2, 1; σ² = 9, 4, 1 of 14
    assert analysis.spectrum_rank(m, 0.5) == 1  # 9/14 = 0.64
    assert analysis.spectrum_rank(m, 0.9) == 2  # 13/14 = 0.93 (σ sums would give 5/6 < 0.9)
    assert analysis.spectrum_rank(m, 13 / 14) == 2  # exact boundary counts as explained
    assert analysis.spectrum_rank(m, 1.0) == 3
    assert analysis.spectrum_rank(np.zeros((3, 3))) == 0


def test_subspace_overlap_self_and_orthogonal():
    rng = np.random.default_rng(0)
    q_NxK = _orthonormal(20, 8, 0)
    planted = q_NxK[:, :3] @ rng.standard_normal((3, 7))
    assert analysis.subspace_overlap(planted, planted, 3) == pytest.approx(1.0)
    rotated = planted @ _orthonormal(7, 7, 1)  # same column space, other row space
    assert analysis.subspace_overlap(rotated, planted, 3) == pytest.approx(1.0)
    other = q_NxK[:, 3:6] @ rng.standard_normal((3, 7))
    assert analysis.subspace_overlap(other, planted, 3) == pytest.approx(0.0, abs=1e-12)
    half = q_NxK[:, [0, 3, 4]] @ rng.standard_normal((3, 7))  # shares one of three directions
    assert analysis.subspace_overlap(half, planted, 3) == pytest.approx(1 / 3)


def _randomized(adapters, seed=0):
    """Random A and B in numpy (B is zero after init; eager jax.random per leaf is slow)."""
    rng = np.random.default_rng(seed)
    return {p: dataclasses.replace(ad, a=0.3 * rng.standard_normal(ad.a.shape),
                                   b=0.3 * rng.standard_normal(ad.b.shape))
            for p, ad in adapter_items(adapters)}


def _check_rebuilds_delta(ad, layers):
    pairs = analysis.as_matrices(ad)
    deltas = analysis.weight_as_matrices(ad.delta(), ad)
    assert len(pairs) == len(deltas) == layers
    delta = np.asarray(ad.delta())
    n_in = int(np.prod([delta.shape[k] for k in ad.inputs]))
    ref_SxIxO = np.transpose(delta, ad.stack + ad.inputs + ad.outputs).reshape(layers, n_in, -1)
    for s, ((a_IxR, b_RxO), delta_IxO) in enumerate(zip(pairs, deltas)):
        assert a_IxR.shape == (n_in, ad.rank) and b_RxO.shape == (ad.rank, ref_SxIxO.shape[-1])
        np.testing.assert_allclose(a_IxR @ b_RxO * ad.scale, ref_SxIxO[s], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(delta_IxO, ref_SxIxO[s], rtol=1e-6, atol=1e-7)
    # The layers differ, so a wrong slice order could not pass.
    assert all(not np.allclose(ref_SxIxO[0], ref_SxIxO[s]) for s in range(1, layers))


def test_as_matrices_one_pair_per_scanned_layer():
    case = zoo.scanned()
    spec = lora_jax.LoraSpec(targets=case.targets, rank=2, alpha=4.0)
    adapters = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    items = _randomized(adapters)
    assert {ad.stack for ad in items.values()} == {(0,)}
    assert any(len(ad.outputs) > 1 for ad in items.values())  # query: [embed] -> [heads, dim]
    assert any(len(ad.inputs) > 1 for ad in items.values())  # out: [heads, dim] -> [embed]
    for ad in items.values():
        _check_rebuilds_delta(ad, layers=4)


def test_as_matrices_any_axis_order():
    """W [out=3, stack=4, in_a=5, in_b=2]: stack in the middle, outputs first."""
    rng = np.random.default_rng(0)
    ad = Adapter(rng.standard_normal((4, 5, 2, 3)), rng.standard_normal((4, 3, 3)), scale=0.5,
                 stack=(1,), inputs=(2, 3), outputs=(0,))
    _check_rebuilds_delta(ad, layers=4)
    unstacked = Adapter(rng.standard_normal((6, 2)), rng.standard_normal((2, 7)), scale=2.0,
                        stack=(), inputs=(0,), outputs=(1,))
    _check_rebuilds_delta(unstacked, layers=1)
    (a, b), = analysis.as_matrices(unstacked)
    np.testing.assert_array_equal(a, unstacked.a)


def test_analyses_run_on_an_adapter_read_back_from_disk(tmp_path):
    case = zoo.scanned()
    spec = lora_jax.LoraSpec(targets=case.targets, rank=2, alpha=4.0)
    adapters = lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)
    items = {p: dataclasses.replace(ad, a=np.float32(ad.a), b=np.float32(ad.b))
             for p, ad in _randomized(adapters).items()}
    save_adapter(str(tmp_path / "saved"), nest(items))
    loaded, _ = load_adapter(str(tmp_path / "saved"))
    for path, ad in adapter_items(loaded):
        for (a, _), (a_ref, _) in zip(analysis.as_matrices(ad), analysis.as_matrices(items[path]),
                                      strict=True):
            assert analysis.subspace_similarity(a, a_ref, 2, 2) == pytest.approx(1.0)
        delta = analysis.weight_as_matrices(ad.delta(), ad)[0]
        assert analysis.spectrum_rank(delta, 0.999) <= 2  # a rank-2 update stays rank 2
