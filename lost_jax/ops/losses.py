"""The LM head fused with token cross-entropy: the [tokens, vocab] logits never exist whole.

`fused_cross_entropy(h, w, targets, weights)` equals `optim.cross_entropy(h @ w, ...)` but
walks the sequence in chunks of `chunk` positions (every row at once, so a batch-sharded h
stays sharded) and, inside a chunk, the vocab in slices of `vocab_chunk` columns, keeping an
online log-sum-exp (running max and rescaled sum, in float32). Under differentiation the
gradients are formed in the same pass, chunk by chunk, while that chunk's logits exist
(`_fused_nll_fwd`): only per-token NLL [B, L], dh [B, L, D] and the head's gradient [D, V]
outlive a chunk. At LLaMA-3's vocab of 128256 and 8 x 1024 tokens that is a [B, chunk, V]
float32 block instead of 4.2 GB of logits (and as much again for their gradient). Matmuls
take operands in the compute dtype with float32 accumulation and follow `layers.matmul`'s
backward choice (`model.perf.matmul_backward`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lost_jax.ops.matmul import contract, weight_grad


def fused_cross_entropy(h_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                        weights_BxL: jax.Array, *, chunk: int, vocab_chunk: int = 0,
                        dtype: Any = None, backward: str = "xla"
                        ) -> tuple[jax.Array, jax.Array]:
  """Weighted NLL sum and weight sum (float32 scalars) of the logits h @ w [B, L, V].

  chunk (static): sequence positions per chunk (each chunk is B x chunk tokens); a last
  partial chunk is padded with zero-weight tokens. vocab_chunk (static): vocab columns per
  slice of the online log-sum-exp (0: the whole vocab at once; the slices are unrolled).
  dtype: the matmuls' operand dtype (None: promotion of h and w). Gradients flow to h, w (a
  tied head passes the embedding transposed) and the weights; targets are integers.
  """
  if chunk < 1 or vocab_chunk < 0:
    raise ValueError(f"chunk={chunk}, vocab_chunk={vocab_chunk}: chunk must be >= 1 and "
                     "vocab_chunk >= 0. Fix: model.perf.loss_chunk / loss_vocab_chunk.")
  length = h_BxLxD.shape[1]
  dtype = jnp.result_type(h_BxLxD, w_DxV) if dtype is None else jnp.dtype(dtype)
  chunk = min(chunk, length)
  pad = -length % chunk
  weights_BxL = weights_BxL.astype(jnp.float32)
  if pad:
    h_BxLxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
    weights_BxL = jnp.pad(weights_BxL, ((0, 0), (0, pad)))
  nll = _fused_nll(h_BxLxD, w_DxV, targets_BxL.astype(jnp.int32), weights_BxL, chunk,
                   vocab_chunk, dtype, backward)
  return nll, jnp.sum(weights_BxL)


def _vocab_slices(vocab: int, vocab_chunk: int) -> list[tuple[int, int]]:
  step = vocab if vocab_chunk in (0, None) or vocab_chunk >= vocab else vocab_chunk
  return [(v0, min(v0 + step, vocab)) for v0 in range(0, vocab, step)]


def _chunk(x, i, chunk):
  """Positions [i * chunk, (i + 1) * chunk) of x [B, L, ...]."""
  return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


def _logits(h_BxCxD, w_DxV, v0, v1, dtype):
  """float32 logits [B, C, v1 - v0] of vocab columns v0..v1."""
  return contract(h_BxCxD, w_DxV[:, v0:v1], 2, 0, dtype).astype(jnp.float32)


def _chunk_stats(h_BxCxD, w_DxV, t_BxC, dtype, slices):
  """Online log-sum-exp over vocab slices and the target's logit, both float32 [B, C], and
  the last slice's logits (all of them when there is one slice)."""
  m = jnp.full(t_BxC.shape, -jnp.inf, jnp.float32)
  s = jnp.zeros(t_BxC.shape, jnp.float32)
  tgt = jnp.zeros(t_BxC.shape, jnp.float32)
  for v0, v1 in slices:
    logits = _logits(h_BxCxD, w_DxV, v0, v1, dtype)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
    m = m_new
    local = jnp.clip(t_BxC - v0, 0, v1 - v0 - 1)
    picked = jnp.take_along_axis(logits, local[..., None], axis=-1)[..., 0]
    tgt = tgt + jnp.where((t_BxC >= v0) & (t_BxC < v1), picked, 0.0)
  return m + jnp.log(s), tgt, logits


def _loop(fn, chunk, length, init):
  """fori_loop of fn(i, carry) over the length // chunk chunks."""
  return jax.lax.fori_loop(0, length // chunk, fn, init)


def _put(x_BxL, c_BxC, i, chunk):
  return jax.lax.dynamic_update_slice_in_dim(x_BxL, c_BxC.astype(x_BxL.dtype), i * chunk, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused_nll(h_BxLxD, w_DxV, targets_BxL, weights_BxL, chunk, vocab_chunk, dtype, backward):
  del backward
  w_cast = w_DxV.astype(dtype)   # one cast of the head, not one per chunk
  slices = _vocab_slices(w_DxV.shape[1], vocab_chunk)

  def body(i, nll_BxL):
    lse, tgt, _ = _chunk_stats(_chunk(h_BxLxD, i, chunk), w_cast,
                               _chunk(targets_BxL, i, chunk), dtype, slices)
    return _put(nll_BxL, lse - tgt, i, chunk)

  nll_BxL = _loop(body, chunk, h_BxLxD.shape[1], jnp.zeros(targets_BxL.shape, jnp.float32))
  return jnp.sum(nll_BxL * weights_BxL)


def _fused_nll_fwd(h, w, targets, weights, chunk, vocab_chunk, dtype, backward):
  """Under differentiation the gradients are formed chunk by chunk in this pass, where the
  chunk's logits exist anyway (one vocab slice: 3 head matmuls, as the plain loss; several
  slices: the log-sum-exp needs all of them first, so each slice's logits are recomputed
  once). The loss is a scalar, so the backward pass only scales them by its cotangent. The
  head's gradient is skipped when the head is not differentiated (a frozen base)."""
  h_BxLxD, w_DxV, targets_BxL, weights_BxL = h.value, w.value, targets.value, weights.value
  w_cast = w_DxV.astype(dtype)
  slices = _vocab_slices(w_DxV.shape[1], vocab_chunk)

  def body(i, carry):
    nll_BxL, dh_BxLxD, dw_DxV = carry
    h_c, t_c = _chunk(h_BxLxD, i, chunk), _chunk(targets_BxL, i, chunk)
    w_c = _chunk(weights_BxL, i, chunk)[..., None]
    lse, tgt, logits = _chunk_stats(h_c, w_cast, t_c, dtype, slices)
    dh_c = jnp.zeros(h_c.shape, jnp.float32)
    for v0, v1 in slices:
      if len(slices) > 1:
        logits = _logits(h_c, w_cast, v0, v1, dtype)
      onehot = jnp.arange(v0, v1) == t_c[..., None]
      dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * w_c).astype(dtype)
      dh_c = dh_c + contract(dlogits, w_cast[:, v0:v1], 2, 1, dtype).astype(jnp.float32)
      if dw_DxV is not None:
        dw_DxV = dw_DxV.at[:, v0:v1].add(
            weight_grad(h_c, dlogits, dtype, backward).astype(jnp.float32))
    return _put(nll_BxL, lse - tgt, i, chunk), _put(dh_BxLxD, dh_c, i, chunk), dw_DxV

  init = (jnp.zeros(targets_BxL.shape, jnp.float32), jnp.zeros(h_BxLxD.shape, jnp.float32),
          jnp.zeros(w_DxV.shape, jnp.float32) if w.perturbed else None)
  nll_BxL, dh_BxLxD, dw_DxV = _loop(body, chunk, h_BxLxD.shape[1], init)
  total = jnp.sum(nll_BxL * weights_BxL)
  return total, (nll_BxL, dh_BxLxD, dw_DxV, jnp.zeros((), h_BxLxD.dtype),
                 jnp.zeros((), w_DxV.dtype))


def _fused_nll_bwd(chunk, vocab_chunk, dtype, backward, residuals, g):
  del chunk, vocab_chunk, dtype, backward
  nll_BxL, dh_BxLxD, dw_DxV, h_like, w_like = residuals
  if isinstance(g, SymbolicZero):
    return None, None, None, None
  dh = (g * dh_BxLxD).astype(h_like.dtype)
  dw = None if dw_DxV is None else (g * dw_DxV).astype(w_like.dtype)
  # d(sum nll * weights) / d weights = nll; targets are integers (no cotangent).
  return dh, dw, None, g * nll_BxL


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd, symbolic_zeros=True)
