"""Channel scores and top-k selection (pure; k static): FFN and attention channels a batch
needs, from the estimators or the true activations."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
import jax.numpy as jnp

from lost_jax.ops.select import top_k_indices
from lost_jax.models.llama import GATE_ACTIVATIONS


def keep_count(n: int, sparsity: float) -> int:
  """Channels kept, int(n * (1 - sparsity)) (robust to float rounding), at least 1."""
  return max(1, int(math.floor(n * (1.0 - sparsity) + 1e-6)))


def _weights(mask_BxL: jax.Array | None, x_BxLxD: jax.Array) -> jax.Array:
  if mask_BxL is None:
    return jnp.ones(x_BxLxD.shape[:2], jnp.float32)
  return mask_BxL.astype(jnp.float32)


def masked_mean(x_BxLxD: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
  """Mean over the masked-in positions of each sequence, float32 [B, D] (0 if none)."""
  w = _weights(mask_BxL, x_BxLxD)
  total = jnp.einsum("bld,bl->bd", x_BxLxD.astype(jnp.float32), w)
  return total / jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None]


def column_norms(y_BxLxM: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
  """||y[:, :, c]||_2 over masked-in tokens, float32 [M]."""
  w = _weights(mask_BxL, y_BxLxM)
  y = y_BxLxM.astype(jnp.float32)
  return jnp.sqrt(jnp.einsum("blm,bl->m", y * y, w))


def low_rank_column_norms(x_BxLxD: jax.Array, mask_BxL: jax.Array | None, p_DxR: jax.Array,
                          q_RxM: jax.Array) -> jax.Array:
  """column_norms(x @ P @ Q) via the r x r Gram matrix of x @ P, float32 [M]."""
  w = _weights(mask_BxL, x_BxLxD)
  z = jnp.einsum("bld,dr->blr", x_BxLxD.astype(jnp.float32), p_DxR)
  gram = jnp.einsum("blr,bls,bl->rs", z, z, w)
  sq = jnp.sum((gram @ q_RxM) * q_RxM, axis=0)
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def ffn_scores(x_BxLxD: jax.Array, mask_BxL: jax.Array | None, est_gate: dict,
               est_up: dict, activation: str = "silu") -> jax.Array:
  """score_j = ||act(x_bar P_g Q_g)_j * (x_bar P_u Q_u)_j||_2 over the batch, [F]; act is the
  model's gated activation (`llama.GATE_ACTIVATIONS`: silu, gelu_tanh)."""
  x_bar = masked_mean(x_BxLxD, mask_BxL)
  g = (x_bar @ est_gate["p"]) @ est_gate["q"]
  u = (x_bar @ est_up["p"]) @ est_up["q"]
  act = GATE_ACTIVATIONS[activation](g) * u
  return jnp.sqrt(jnp.sum(act * act, axis=0))


def qk_scores(qnorm_Q: jax.Array, knorm_C: jax.Array, n_heads: int,
              n_kv_heads: int) -> jax.Array:
  """kv-channel score ||k(j,d)|| * sqrt(sum_{h in group j} ||q(h,d)||^2), [KV*hd]."""
  hd = knorm_C.shape[0] // n_kv_heads
  g = n_heads // n_kv_heads
  q_group = jnp.sqrt(jnp.sum(jnp.square(qnorm_Q.reshape(n_kv_heads, g, hd)), axis=1))
  return (q_group * knorm_C.reshape(n_kv_heads, hd)).reshape(-1)


def query_columns(kv_idx_K: jax.Array, n_heads: int, n_kv_heads: int,
                  head_dim: int) -> jax.Array:
  """kv channels (j, d) -> sorted columns (h, d) of every query head h in group j, [K * G]."""
  g = n_heads // n_kv_heads
  j, d = kv_idx_K // head_dim, kv_idx_K % head_dim
  heads = j[None, :] * g + jnp.arange(g, dtype=kv_idx_K.dtype)[:, None]   # [G, K]
  return jnp.sort((heads * head_dim + d[None, :]).reshape(-1)).astype(jnp.int32)


class AttnIndices(NamedTuple):
  """Kept columns of q [k*G], k [k], v [k] and kept input rows of o [k*G] (int32)."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  o: jax.Array


def select_attention(qnorm_Q: jax.Array, knorm_C: jax.Array, vnorm_C: jax.Array,
                     sparsity: float, n_heads: int, n_kv_heads: int) -> AttnIndices:
  """Top-k kv channels by qk and by v score, expanded to q columns / o rows per GQA group."""
  c = knorm_C.shape[0]
  hd = c // n_kv_heads
  k = keep_count(c, sparsity)
  kv_qk = top_k_indices(qk_scores(qnorm_Q, knorm_C, n_heads, n_kv_heads), k)
  kv_v = top_k_indices(vnorm_C, k)
  return AttnIndices(q=query_columns(kv_qk, n_heads, n_kv_heads, hd), k=kv_qk, v=kv_v,
                     o=query_columns(kv_v, n_heads, n_kv_heads, hd))


def channel_overlap(idx_a_K: jax.Array, idx_b_K: jax.Array) -> float:
  """|a & b| / |a| of two kept-channel index sets (estimator vs oracle)."""
  a, b = np.asarray(idx_a_K).ravel(), np.asarray(idx_b_K).ravel()
  return float(np.intersect1d(a, b).size / max(1, np.unique(a).size))


def random_scores(x_BxLxD: jax.Array, n: int, salt: int) -> jax.Array:
  """Uniform scores [n] that change with the batch (keyed by the bits of sum(x)) and salt."""
  bits = jax.lax.bitcast_convert_type(jnp.sum(x_BxLxD.astype(jnp.float32)), jnp.int32)
  return jax.random.uniform(jax.random.fold_in(jax.random.key(salt), bits), (n,))
