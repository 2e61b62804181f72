"""Embedding pooling, in-batch contrastive loss and ranking metrics for retrieval tasks.

All functions are pure JAX (jit-able, no host sync) and written without implicit rank
broadcasting, so they run under jax_numpy_rank_promotion="raise".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_TEMPERATURE = 0.05  # sentence-transformers MultipleNegativesRankingLoss: scale 20


def mean_pool(hidden_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean of the unmasked token vectors (sentence-transformers' pooling for MiniLM) -> BxD.

    Rows with an all-zero mask give zeros instead of NaN.
    """
    mask_BxTx1 = mask_BxT.astype(hidden_BxTxD.dtype)[:, :, None]
    summed_BxD = jnp.sum(hidden_BxTxD * mask_BxTx1, axis=1)
    count_Bx1 = jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1e-9)
    return summed_BxD / count_Bx1


def l2_normalize(x_BxD: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit vectors along the last axis, so dot products are cosine similarities."""
    norm_Bx1 = jnp.linalg.norm(x_BxD, axis=-1, keepdims=True)
    return x_BxD / jnp.maximum(norm_Bx1, eps)


def info_nce_loss(
    q_BxD: jax.Array, c_BxD: jax.Array, temperature: float = DEFAULT_TEMPERATURE
) -> jax.Array:
    """In-batch contrastive loss, one-directional query -> code (scalar, float32).

    Row i of logits = q_i . c_j / temperature over all codes j in the batch; the target is j = i
    and every other code is a negative. This is sentence-transformers'
    MultipleNegativesRankingLoss; like it, pass L2-normalised embeddings (cosine similarity),
    temperature 0.05 == its scale 20. Mean cross-entropy over the B queries.
    """
    q_BxD = q_BxD.astype(jnp.float32)
    c_BxD = c_BxD.astype(jnp.float32)
    logits_BxB = (q_BxD @ c_BxD.T) / temperature
    positive_B = jnp.diagonal(logits_BxB)
    return jnp.mean(jax.nn.logsumexp(logits_BxB, axis=1) - positive_B)


def ranks(q_NxD: jax.Array, c_NxD: jax.Array) -> jax.Array:
    """1-based rank of code i for query i among all N codes (int32, N).

    Rank = 1 + number of codes scoring strictly higher than the correct one, so ties resolve in
    the query's favour deterministically instead of depending on sort order.
    """
    scores_NxN = jnp.matmul(
        q_NxD.astype(jnp.float32),
        c_NxD.astype(jnp.float32).T,
        precision=jax.lax.Precision.HIGHEST,  # no TF32/bf16 passes: ties and order stay exact
    )
    correct_Nx1 = jnp.diagonal(scores_NxN)[:, None]
    return 1 + jnp.sum(scores_NxN > correct_Nx1, axis=1, dtype=jnp.int32)


def retrieval_metrics(q_NxD: jax.Array, c_NxD: jax.Array) -> dict[str, jax.Array]:
    """{"r@1", "r@10", "mrr"} (float32 scalars) of ranking all N codes for each query.

    Query i's correct code is code i. Scores are raw dot products: normalise first for cosine.
    """
    rank_N = ranks(q_NxD, c_NxD)
    return {
        "r@1": jnp.mean(rank_N <= 1, dtype=jnp.float32),
        "r@10": jnp.mean(rank_N <= 10, dtype=jnp.float32),
        "mrr": jnp.mean(1.0 / rank_N.astype(jnp.float32)),
    }
