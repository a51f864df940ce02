"""Static-shape index selection (pure): the k largest scores and the columns they name."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_indices(score_N: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest scores, sorted ascending, int32 [k]."""
  _, idx = jax.lax.top_k(score_N, k)
  return jnp.sort(idx).astype(jnp.int32)


def take_cols(a_XxN: jax.Array, idx_K: jax.Array) -> jax.Array:
  """a[..., idx] [..., K] for in-range idx (top-k positions: no out-of-range fill pass).

  As take_along_axis, XLA:CPU writes the result row-major in place, where jnp.take(axis=-1)
  gathers whole columns and transposes them (~2x slower matmuls)."""
  return jnp.take_along_axis(a_XxN, jnp.broadcast_to(idx_K, a_XxN.shape[:-1] + idx_K.shape),
                             axis=-1, mode="promise_in_bounds")
