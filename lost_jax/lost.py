"""LOST decomposition: SVD split of a kernel into low-rank factors + channel-sparse complement."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lost_jax.configs import lost_keep

SPARSE_INITS = ("complement", "weight", "random_channels")


class LostFactors(NamedTuple):
  """a [n, r], b [m, r], indices int32 [k] (sorted), values [k, m]."""
  a: jax.Array
  b: jax.Array
  indices: jax.Array
  values: jax.Array


def check_lost_shapes(n: int, m: int, rank: int, sparsity: float,
                      complement_rank: int | None = None) -> int:
  """Validate a LOST layer's settings; return k, the number of kept input channels."""
  p = min(n, m)
  if not isinstance(rank, int) or not 1 <= rank <= p:
    raise ValueError(f"LOST rank={rank} is impossible for a {n}x{m} kernel. "
                     f"Fix: choose rank in 1..{p} (model.linear.rank).")
  if not 0.0 < sparsity <= 1.0:
    raise ValueError(f"LOST sparsity={sparsity} is outside (0, 1]. Fix: use the fraction of "
                     "input channels to keep, e.g. 0.01 (model.linear.sparsity).")
  if complement_rank is not None and complement_rank < 1:
    raise ValueError(f"complement_rank={complement_rank} must be >= 1 or None (all "
                     "remaining components). Fix: model.linear.complement_rank=0 means all.")
  return lost_keep(n, sparsity)


def channel_scores(complement_NxM: jax.Array) -> jax.Array:
  """Importance of each input channel: L2 norm of its complement row, [n]."""
  return jnp.sqrt(jnp.sum(jnp.square(complement_NxM), axis=-1))


def top_channels(scores_N: jax.Array, k: int) -> jax.Array:
  """Sorted int32 indices of the k largest scores, [k]."""
  _, idx = jax.lax.top_k(scores_N, k)
  return jnp.sort(idx).astype(jnp.int32)


def lost_split(kernel: jax.Array, rank: int, sparsity: float, *,
               complement_rank: int | None = None, sparse_init: str = "complement",
               key: jax.Array | None = None) -> LostFactors:
  """Split K0 [n, m] into A [n, r], B [m, r] (top-r SVD) and channel-sparse (I [k], S [k, m])."""
  n, m = kernel.shape
  k = check_lost_shapes(n, m, rank, sparsity, complement_rank)
  if sparse_init not in SPARSE_INITS:
    raise ValueError(f"sparse_init={sparse_init!r} is unknown. Fix: use one of {SPARSE_INITS}.")
  if sparse_init == "random_channels" and key is None:
    raise ValueError("sparse_init='random_channels' needs a PRNG key (key=...).")
  k0 = kernel.astype(jnp.float32)
  u, s, vt = jnp.linalg.svd(k0, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  a = u[:, :rank] * root
  b = vt[:rank].T * root
  stop = min(n, m) if complement_rank is None else min(min(n, m), rank + complement_rank)
  complement = (u[:, rank:stop] * s[rank:stop]) @ vt[rank:stop]
  if sparse_init == "random_channels":
    indices = jnp.sort(jax.random.choice(key, n, (k,), replace=False)).astype(jnp.int32)
  else:
    indices = top_channels(channel_scores(complement), k)
  source = complement if sparse_init == "complement" else k0
  return LostFactors(a, b, indices, source[indices])
