"""PiSSA and OLoRA: adapters that start as W's own principal part, on the residual base W − s·A₀·B₀.

PEFT does this by overwriting the base weight in place. Here nothing is mutated:

  adapters = lora_jax.init(key, fn, params, x, spec=LoraSpec(..., init="pissa"))   # A₀, B₀
  residual = lora_jax.residual_base(params, adapters)   # a NEW tree: W − s·A₀·B₀ where adapted
  lora_jax.apply(fn, residual, adapters, x) == fn(params, x)   # at init, to fp32 rounding

Train the adapters on `residual` and keep the initial adapters (adapter-sized): they rebuild the
residual from the original base at any time (the main job stores them in its checkpoints), and
`lora_jax.variants.convert.to_plain_lora` turns the trained adapters into a rank-2r LoRA on the
ORIGINAL base, the only form that may be merged, stacked or combined with other adapters on it,
or exported to PEFT and vLLM.

The factors, per matrix M [n_in, n_out] (W's stack axes vmapped over; multi-axis inputs and
outputs flattened), in our layout A [n_in, r], B [r, n_out] (PEFT's lora_A, lora_B transposed):
  pissa          M = U S Vh;  A = U_r·√(S_r/s),  B = √(S_r/s)·Vh_r   (so s·A·B = U_r S_r Vh_r)
  pissa_niter_K  the same from a randomised SVD with r columns and K subspace iterations
                 (torch.svd_lowrank's algorithm, on Mᵀ as PEFT runs it)
  olora          Q, R = qr(Mᵀ) (PEFT's W [out, in]);  A = R_rᵀ,  B = Q_rᵀ   (not divided by s)
SVD and QR run in fp32; the residual is computed in fp32 and cast back to W's dtype (in bf16 the
rounding of W_res makes the init equal the base only to bf16 precision, as in PEFT).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import adapter_items, unmerge
from lora_jax.errors import LoraError
from lora_jax.paths import flat_paths
from lora_jax.quant.weight import is_quantized
from lora_jax.spec import pissa_niter

PyTree = Any


def _lowrank_svd(m_IxO: jax.Array, rank: int, niter: int, key: jax.Array):
    """(U [I, r], S [r], Vh [r, O]) of M from torch.svd_lowrank's range finder run on X = Mᵀ."""
    x_OxI = m_IxO.T
    q_Oxr, _ = jnp.linalg.qr(x_OxI @ jax.random.normal(key, (x_OxI.shape[1], rank), x_OxI.dtype))
    for _ in range(niter):
        q_Ixr, _ = jnp.linalg.qr(x_OxI.T @ q_Oxr)
        q_Oxr, _ = jnp.linalg.qr(x_OxI @ q_Ixr)
    u_rxr, s_r, vh_rxI = jnp.linalg.svd(q_Oxr.T @ x_OxI, full_matrices=False)
    return vh_rxI.T, s_r, (q_Oxr @ u_rxr).T  # X ≈ (Q U) S Vh, so M ≈ Vhᵀ S (Q U)ᵀ


def _matrix_factors(m_IxO: jax.Array, key: jax.Array, *, rank: int, scale: float, init: str):
    if init == "olora":
        q_Oxk, r_kxI = jnp.linalg.qr(m_IxO.T)
        return r_kxI[:rank].T, q_Oxk[:, :rank].T
    if init == "pissa":
        u, s, vh = jnp.linalg.svd(m_IxO, full_matrices=False)
    else:
        u, s, vh = _lowrank_svd(m_IxO, rank, pissa_niter(init), key)
    root_r = jnp.sqrt(s[:rank] / scale)
    return u[:, :rank] * root_r[None, :], root_r[:, None] * vh[:rank]


@functools.partial(jax.jit, static_argnames=("axes", "rank", "scale", "init"))
def _factors(key, w, *, axes, rank, scale, init):
    stack, inputs, outputs = axes
    sizes = lambda group: tuple(w.shape[j] for j in group)
    n_in, n_out = math.prod(sizes(inputs)), math.prod(sizes(outputs))
    m_NxIxO = jnp.transpose(w, (*stack, *inputs, *outputs)).astype(jnp.float32).reshape(-1, n_in, n_out)
    keys = jax.random.split(key, m_NxIxO.shape[0])
    one = functools.partial(_matrix_factors, rank=rank, scale=scale, init=init)
    a_NxIxr, b_NxrxO = jax.vmap(one)(m_NxIxO, keys)
    return (a_NxIxr.reshape(*sizes(stack), *sizes(inputs), rank),
            b_NxrxO.reshape(*sizes(stack), rank, *sizes(outputs)))


def principal_factors(key: jax.Array, w: Any, path: str, axes: tuple, rank: int, scale: float,
                      init: str, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(A₀, B₀) of weight `w` for `init` ("pissa", "pissa_niter_K", "olora"), laid out by
    `axes` = (stack, inputs, outputs) as `Adapter` lays them out; `key` seeds pissa_niter_K."""
    if is_quantized(w):
        raise LoraError(f"init={init!r} needs the dense weight of '{path}', which is quantised; PiSSA/"
                        "OLoRA subtract their initial factors from W: start from a dense base")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise LoraError(f"init={init!r} needs a float weight; '{path}' is {w.dtype}")
    a, b = _factors(key, w, axes=axes, rank=rank, scale=float(scale), init=init)
    return a.astype(dtype), b.astype(dtype)


def residual_base(params: PyTree, initial: PyTree) -> PyTree:
    """A new params tree with W − s·A₀·B₀ at every path of `initial` (the adapters as `init`
    made them with a PiSSA/OLoRA spec); every other leaf is `params`' own. `params` is untouched.

    The subtraction runs in fp32 and is cast back to W's dtype (`lora_jax.unmerge`).
    """
    weights = dict(flat_paths(params, is_leaf=is_quantized))
    for path, ad in adapter_items(initial):
        if getattr(ad, "is_dora", False):
            raise LoraError(f"residual_base: the adapter of '{path}' is a DoRA adapter; PiSSA/OLoRA "
                            "residuals are made from plain LoRA factors only")
        if is_quantized(weights.get(path)):
            raise LoraError(f"residual_base: '{path}' is quantised; the residual W − s·A₀·B₀ needs "
                            "the dense weight")
    return unmerge(params, initial)
