"""Analyses of learned low-rank updates: LoRA (Hu et al. 2021, §7) and Biderman et al. 2024.

Everything works on plain 2-d matrices in float64 numpy (the analyses are small, run once,
and need accurate SVDs); `as_matrices` / `weight_as_matrices` turn any saved `Adapter` (and
its base weight) into such matrices, one per stacked layer.

Layout note: our A is [in, r] (the paper's A is [r, in]), so the paper's *right* singular
vectors of A are our *left* singular vectors of A. ΔW and W are [in, out] throughout, so a
matrix's column space is its input-side subspace.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lora_jax.adapters import Adapter


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _matrix(x: Any, name: str) -> np.ndarray:
    m = _f64(x)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-d [in, out] matrix, got shape {m.shape}")
    return m


def _left_singular(m_NxM: np.ndarray) -> np.ndarray:
    """Left singular vectors, columns sorted by decreasing singular value."""
    u_NxK, _, _ = np.linalg.svd(m_NxM, full_matrices=False)
    return u_NxK


def as_matrices(adapter: Adapter) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A [in, r], B [r, out]) per stack index, inputs/outputs axes flattened.

    A scanned layer axis gives one pair per layer, so per-layer analyses (as in the papers) can
    treat every adapter as a plain matrix pair. ΔW of pair s is `scale · A @ B`.
    """
    n_stack = len(adapter.stack)
    a, b = _f64(adapter.a), _f64(adapter.b)
    r = a.shape[-1]
    n_layers = math.prod(a.shape[:n_stack])
    a_SxIxR = a.reshape(n_layers, -1, r)
    b_SxRxO = b.reshape(n_layers, r, -1)
    return [(a_SxIxR[s], b_SxRxO[s]) for s in range(n_layers)]


def weight_as_matrices(w: Any, adapter: Adapter) -> list[np.ndarray]:
    """W (or any array in W's layout, e.g. `adapter.delta()`) as [in, out] matrices per stack index.

    Uses the adapter's axis grouping, so slice s lines up with `as_matrices(adapter)[s]`; needed
    to compare ΔW with the base weight (`amplification_factor`).
    """
    w = _f64(w)
    if w.ndim != adapter.w_ndim:
        raise ValueError(f"array has {w.ndim} axes, the adapter is laid out for {adapter.w_ndim}")
    order = adapter.stack + adapter.inputs + adapter.outputs
    w_t = np.transpose(w, order)
    n_layers = math.prod(w_t.shape[: len(adapter.stack)])
    n_in = math.prod(w.shape[i] for i in adapter.inputs)
    w_SxIxO = w_t.reshape(n_layers, n_in, -1)
    return list(w_SxIxO)


def subspace_similarity_grid(a1_NxR1: Any, a2_NxR2: Any) -> np.ndarray:
    """φ(A₁, A₂, i, j) for all 1 ≤ i ≤ r1, 1 ≤ j ≤ r2, as a [r1, r2] array (entry [i-1, j-1]).

    φ = ‖U₁ᵢᵀ U₂ⱼ‖²_F / min(i, j) with Uᵢ the top-i left singular vectors of our [in, r] A
    (the paper's right singular vectors of its [r, in] A). 1 means one subspace contains the
    other, 0 means orthogonal. One SVD each plus a 2-d cumulative sum gives the whole heatmap.
    """
    a1, a2 = _matrix(a1_NxR1, "a1"), _matrix(a2_NxR2, "a2")
    if a1.shape[0] != a2.shape[0]:
        raise ValueError(f"A1 {a1.shape} and A2 {a2.shape} live in different input spaces")
    u1_NxR1, u2_NxR2 = _left_singular(a1), _left_singular(a2)
    overlap_R1xR2 = (u1_NxR1.T @ u2_NxR2) ** 2
    cum_R1xR2 = overlap_R1xR2.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, cum_R1xR2.shape[0] + 1)[:, None]
    j = np.arange(1, cum_R1xR2.shape[1] + 1)[None, :]
    return np.clip(cum_R1xR2 / np.minimum(i, j), 0.0, 1.0)


def subspace_similarity(a1_NxR1: Any, a2_NxR2: Any, i: int, j: int) -> float:
    """φ(A₁, A₂, i, j) of Hu et al. (2021) eq. 4; see `subspace_similarity_grid`."""
    r1, r2 = _f64(a1_NxR1).shape[-1], _f64(a2_NxR2).shape[-1]
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}, got i={i}, j={j}")
    return float(subspace_similarity_grid(a1_NxR1, a2_NxR2)[i - 1, j - 1])


def _random_orthonormal(n: int, r: int, rng: np.random.Generator) -> np.ndarray:
    q_NxR, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q_NxR


def amplification_factor(delta_W: Any, W: Any, r: int, seed: int = 0) -> dict[str, float]:
    """How much ΔW amplifies directions of W (Hu et al. 2021, Table 7 and App. H.4).

    W is projected onto an r-dim subspace, ‖UᵀWVᵀ‖_F, for three choices of U [in, r], Vᵀ [r, out]:
    ΔW's top-r singular directions ("delta"), random orthonormal directions seeded by `seed`
    ("random") and W's own top-r directions ("w"). A large ‖ΔW‖_F / ‖UᵀWVᵀ‖_F for "delta"
    means ΔW boosts directions that W barely uses. Returns `delta_norm`, and per choice
    `proj_<choice>` (the projected norm) and `ratio_<choice>` (delta_norm / proj).
    """
    d_IxO, w_IxO = _matrix(delta_W, "delta_W"), _matrix(W, "W")
    if d_IxO.shape != w_IxO.shape:
        raise ValueError(f"delta_W {d_IxO.shape} and W {w_IxO.shape} differ in shape")
    if not 1 <= r <= min(w_IxO.shape):
        raise ValueError(f"r={r} must be in [1, {min(w_IxO.shape)}]")
    rng = np.random.default_rng(seed)
    u_d, _, vt_d = np.linalg.svd(d_IxO, full_matrices=False)
    u_w, _, vt_w = np.linalg.svd(w_IxO, full_matrices=False)
    bases = {
        "delta": (u_d[:, :r], vt_d[:r].T),
        "random": (_random_orthonormal(w_IxO.shape[0], r, rng),
                   _random_orthonormal(w_IxO.shape[1], r, rng)),
        "w": (u_w[:, :r], vt_w[:r].T),
    }
    delta_norm = float(np.linalg.norm(d_IxO))
    out = {"delta_norm": delta_norm}
    for name, (u_IxR, v_OxR) in bases.items():
        proj = float(np.linalg.norm(u_IxR.T @ w_IxO @ v_OxR))
        out[f"proj_{name}"] = proj
        out[f"ratio_{name}"] = delta_norm / proj if proj > 0 else math.inf
    return out


def spectrum_rank(delta_W: Any, fraction: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold `fraction` of the energy Σσ².

    Energy (σ², not σ) because Σσ² = ‖ΔW‖²_F: by Eckart–Young the best rank-k approximation
    then has relative squared Frobenius error ≤ 1 - fraction. Used as "the rank full
    fine-tuning's ΔW needs to explain 90%" (Biderman et al. 2024). A zero matrix has rank 0.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    s = np.linalg.svd(_matrix(delta_W, "delta_W"), compute_uv=False)
    energy = np.cumsum(s**2)
    if energy.size == 0 or energy[-1] == 0.0:
        return 0
    explained = energy / energy[-1]
    k = int(np.searchsorted(explained, fraction * (1.0 - 1e-12))) + 1
    return min(k, s.size)


def subspace_overlap(learned_delta: Any, planted_delta: Any, k: int) -> float:
    """‖U₁ᵀU₂‖²_F / k for the top-k column (input-side) singular subspaces, in [0, 1].

    1 when the learned update spans exactly the planted input directions, about k/in for
    unrelated ones; sign and rotation within the subspace do not matter.
    """
    m1, m2 = _matrix(learned_delta, "learned_delta"), _matrix(planted_delta, "planted_delta")
    if m1.shape[0] != m2.shape[0]:
        raise ValueError(f"{m1.shape} and {m2.shape} have different input dimensions")
    if not 1 <= k <= min(*m1.shape, *m2.shape):
        raise ValueError(f"k={k} must be in [1, {min(*m1.shape, *m2.shape)}]")
    u1_NxK, u2_NxK = _left_singular(m1)[:, :k], _left_singular(m2)[:, :k]
    return float(np.clip(np.sum((u1_NxK.T @ u2_NxK) ** 2) / k, 0.0, 1.0))
