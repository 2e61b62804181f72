"""A memory-faithful CPU lowering of ragged_dot, for planning MoE steps on a fake CPU mesh.

XLA:CPU has no ragged-dot instruction, so JAX lowers ragged_dot there by expanding the tokens
densely against every expert ([E, M, in] temporaries: hundreds of GiB at the Qwen3-30B-A3B shape)
-- memory a GPU or TPU, whose XLA runs it as a grouped matmul, never holds. `use_loop_lowering`
replaces that, for the process, by a loop over experts that keeps only what a grouped matmul
keeps (its operands and output, one expert's product at a time): the FLOPs are not a grouped
matmul's, the memory is. benchmarks.plan uses it for MoE presets; nothing else should.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lax import lax as lax_internal


def _row_masks(group_sizes_G, rows: int):
    ends_G = jnp.cumsum(group_sizes_G)
    starts_G = ends_G - group_sizes_G
    row_M = jnp.arange(rows)
    return lambda g: (row_M >= starts_G[g]) & (row_M < ends_G[g])


def _loop_impl(lhs, rhs, group_sizes, *, ragged_dot_dimension_numbers, precision,
               preferred_element_type, group_offset=None, out_sharding=None):
    dn = ragged_dot_dimension_numbers
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    mask = _row_masks(group_sizes, lhs.shape[0])
    standard = (lhs.ndim == 2 and not lb and not rb and dn.lhs_ragged_dimensions == (0,))
    if standard and dn.rhs_group_dimensions == (0,) and lc == (1,) and rhs.ndim == 3:
        # [M, K] x [G, K, N] (or [G, N, K]): rows of group g meet rhs[g]
        def body(g, out_MxN):
            w = jax.lax.dynamic_index_in_dim(rhs, g, 0, keepdims=False)
            y = jax.lax.dot_general(lhs, w, ((lc, (rc[0] - 1,)), ((), ())), precision=precision,
                                    preferred_element_type=out_dtype)
            return out_MxN + jnp.where(mask(g)[:, None], y, jnp.zeros_like(y))

        out = jnp.zeros((lhs.shape[0], rhs.shape[3 - rc[0]]), out_dtype)
        return jax.lax.fori_loop(0, group_sizes.shape[0], body, out)
    if standard and dn.rhs_group_dimensions == () and lc == (0,) and rc == (0,) and rhs.ndim == 2:
        # the weight's gradient: out[g] = lhs[rows of g]^T · rhs[rows of g]
        def body(g, out_GxKxN):
            x = jnp.where(mask(g)[:, None], lhs, jnp.zeros_like(lhs))
            y = jax.lax.dot_general(x, rhs, ((lc, rc), ((), ())), precision=precision,
                                    preferred_element_type=out_dtype)
            return jax.lax.dynamic_update_index_in_dim(out_GxKxN, y, g, 0)

        out = jnp.zeros((group_sizes.shape[0], lhs.shape[1], rhs.shape[1]), out_dtype)
        return jax.lax.fori_loop(0, group_sizes.shape[0], body, out)
    return lax_internal._ragged_dot_general_impl(
        lhs, rhs, group_sizes, ragged_dot_dimension_numbers=dn, precision=precision,
        preferred_element_type=preferred_element_type, group_offset=group_offset)


@functools.cache
def use_loop_lowering() -> None:
    """Lower ragged_dot on CPU as `_loop_impl` from now on in this process."""
    mlir.register_lowering(lax_internal.ragged_dot_general_p,
                           mlir.lower_fun(_loop_impl, multiple_results=False), platform="cpu")
