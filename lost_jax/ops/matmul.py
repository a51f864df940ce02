"""Matmul primitives with hand-written VJPs: bf16 operands accumulate in float32, and an
XLA:CPU-friendly backward (`model.perf.matmul_backward`). Used by every projection, the
attention einsums and the fused loss."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def _cast(dtype, *arrays):
  if dtype is None:
    return arrays
  return tuple(jnp.asarray(a, dtype) for a in arrays)


def matmul(x_BxN: jax.Array, w_NxM: jax.Array, dtype: Any = None,
           out_dtype: Any = None, backward: str = "xla") -> jax.Array:
  """x @ w [..., M] in the compute `dtype` (None: promotion), result cast to `out_dtype`.

  One custom VJP spells out the three matmuls of forward and backward, for two reasons:
  - bf16/f16 operands accumulate in float32 in all three. XLA:CPU runs such dots about twice
    as fast as float32 ones (plain bf16 dots are slower), while JAX's own transpose of a
    `preferred_element_type=float32` dot upcasts the backward to float32 dots.
  - backward='cpu_transposed' (model.perf.matmul_backward, chosen for XLA:CPU targets): the
    weight gradient transposes the narrower of x [T, N] and the cotangent [T, M] explicitly
    (`transposed_tokens`; x^T g or (g^T x)^T) behind optimisation barriers: left to itself
    XLA:CPU fuses a transpose of the wider cotangent [T, M] into its producer, a slow strided
    write (~25% of a llama_60m float32 train step), or upcasts bf16 to float32.
    backward='xla' (GPU, TPU) is the plain contraction over tokens, no barriers.
  The cotangent of the result is cast back to the compute dtype; the weight gradient stays
  float32 until it is cast to the weight's own dtype.
  """
  if backward not in ("xla", "cpu_transposed"):
    raise ValueError(f"matmul backward={backward!r} is unknown. Fix: 'xla' or "
                     "'cpu_transposed' (model.perf.matmul_backward, resolved).")
  dtype = jnp.result_type(x_BxN, w_NxM) if dtype is None else jnp.dtype(dtype)
  out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
  return _matmul(x_BxN, w_NxM, dtype, out_dtype, backward)


def matmul_appended(x_BxN: jax.Array, w_NxR: jax.Array, const_NxK: jax.Array,
                    dtype: Any = None, out_dtype: Any = None, backward: str = "xla") -> jax.Array:
  """x @ [w | const] [..., R + K] as one matmul; `const` (no gradient) appended to w's columns.

  As `matmul`, but the weight gradient is x^T g[..., :R], never the [N, R + K] gradient of the
  concatenated kernel sliced afterwards: under FSDP the TPU compiler (libtpu 0.0.42, jax
  0.10.2's pin) rewrites the all-reduce + slice of that gradient into a reduce-scatter and
  fails on the column slice (RET_CHECK "The shape doesn't match when replacing").
  """
  if backward not in ("xla", "cpu_transposed"):
    raise ValueError(f"matmul backward={backward!r} is unknown. Fix: 'xla' or "
                     "'cpu_transposed' (model.perf.matmul_backward, resolved).")
  dtype = jnp.result_type(x_BxN, w_NxR) if dtype is None else jnp.dtype(dtype)
  out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
  return _matmul_appended(x_BxN, w_NxR, const_NxK, dtype, out_dtype, backward)


def contract(a, b, a_dim: int, b_dim: int, dtype):
  """dot_general of a and b contracting a_dim with b_dim (no batch axes), both operands cast to
  dtype; sub-32-bit dtypes accumulate in float32 (the result is then float32)."""
  acc = jnp.float32 if dtype.itemsize < 4 else None
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((a_dim,), (b_dim,)), ((), ())),
                             preferred_element_type=acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x_BxN, w_NxM, dtype, out_dtype, backward):
  del backward
  return contract(x_BxN, w_NxM, x_BxN.ndim - 1, 0, dtype).astype(out_dtype)


def _matmul_fwd(x_BxN, w_NxM, dtype, out_dtype, backward):
  return _matmul(x_BxN, w_NxM, dtype, out_dtype, backward), (x_BxN, w_NxM)


def _matmul_bwd(dtype, out_dtype, backward, residuals, g_BxM):  # pylint: disable=unused-argument
  x_BxN, w_NxM = residuals
  g = g_BxM.astype(dtype)
  dx = contract(g, w_NxM, g.ndim - 1, 1, dtype).astype(x_BxN.dtype)
  return dx, weight_grad(x_BxN, g, dtype, backward).astype(w_NxM.dtype)


def weight_grad(x_BxN: jax.Array, g_BxM: jax.Array, dtype, backward: str) -> jax.Array:
  """x^T g [N, M] summed over tokens (float32 for bf16/f16 operands), as `matmul`'s backward."""
  g = g_BxM.astype(dtype)
  g_TxM = g.reshape(-1, g.shape[-1])
  if backward == "cpu_transposed":
    # Transpose the narrower of x [T, N] and g [T, M] (LOST's first matmul: g is [T, r + k]).
    if g_TxM.shape[-1] < x_BxN.shape[-1]:
      x_TxN = x_BxN.astype(dtype).reshape(-1, x_BxN.shape[-1])
      dw = jax.lax.optimization_barrier(contract(transposed_tokens(g), x_TxN, 1, 0, dtype)).T
    else:
      dw = contract(transposed_tokens(x_BxN.astype(dtype)), g_TxM, 1, 0, dtype)
    # A caller's transpose of w (b.T) would otherwise fold into this dot as a contraction
    # over dim 0 of both operands, which XLA:CPU cannot run in bf16 (UNIMPLEMENTED).
    return jax.lax.optimization_barrier(dw)
  return contract(x_BxN.reshape(-1, x_BxN.shape[-1]), g_TxM, 0, 0, dtype)


def transposed_tokens(x_BxN: jax.Array) -> jax.Array:
  """x [..., N] -> [N, T] as a materialised copy (XLA:CPU; also LoRA's [T, r] transposes).

  A 2-D transpose would be folded into the dot as a contraction over dim 0, which XLA:CPU runs
  as an upcast float32 dot for bf16; moving the last axis of the N-D array to the front is not
  folded, and the barrier keeps XLA from fusing the transpose into the cotangent's producer.
  """
  n = x_BxN.shape[-1]
  if x_BxN.ndim >= 3:
    x_NxT = jnp.moveaxis(x_BxN, -1, 0).reshape(n, -1)
  else:
    x_NxT = x_BxN.reshape(-1, n).T
  return jax.lax.optimization_barrier(x_NxT)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _matmul_appended(x_BxN, w_NxR, const_NxK, dtype, out_dtype, backward):
  del backward
  w_NxW = jnp.concatenate([w_NxR, const_NxK.astype(w_NxR.dtype)], axis=1)
  return contract(x_BxN, w_NxW, x_BxN.ndim - 1, 0, dtype).astype(out_dtype)


def _matmul_appended_fwd(x_BxN, w_NxR, const_NxK, dtype, out_dtype, backward):
  return (_matmul_appended(x_BxN, w_NxR, const_NxK, dtype, out_dtype, backward),
          (x_BxN, w_NxR, const_NxK))


def _matmul_appended_bwd(dtype, out_dtype, backward, residuals, g_BxW):  # pylint: disable=unused-argument
  x_BxN, w_NxR, const_NxK = residuals
  g = g_BxW.astype(dtype)
  w_NxW = jnp.concatenate([w_NxR, const_NxK.astype(w_NxR.dtype)], axis=1)
  dx = contract(g, w_NxW, g.ndim - 1, 1, dtype).astype(x_BxN.dtype)
  dw = weight_grad(x_BxN, g[..., :w_NxR.shape[-1]], dtype, backward).astype(w_NxR.dtype)
  return dx, dw, jnp.zeros_like(const_NxK)


_matmul_appended.defvjp(_matmul_appended_fwd, _matmul_appended_bwd)


def batched_matmul(a_ZxQxK: jax.Array, b: jax.Array, *, transpose_b: bool,
                   dtype: Any = None, backward: str = "xla") -> jax.Array:
  """Float32 a @ b [..., Q, S or K] over leading batch axes: b is [..., S, K] with transpose_b
  (scores q k^T), else [..., S, K] contracted over S (weights @ values).

  As `matmul`, one custom VJP so all three products take operands in the compute `dtype`
  (None: promotion) with float32 accumulation: JAX's transpose of a
  `preferred_element_type=float32` dot runs the backward as float32 dots on upcast copies, and
  a bf16 dot without it (weights @ values) is upcast to float32 by XLA:CPU in the forward too.
  backward='cpu_transposed' (model.perf.matmul_backward): for bf16/f16 operands the product
  contracting over q transposes its [.., q, s] operand explicitly (a dot contracting dim -2
  of both operands runs upcast to float32 on XLA:CPU); float32 keeps the plain contraction.
  Results are float32 [..., Q, S or K].
  """
  if backward not in ("xla", "cpu_transposed"):
    raise ValueError(f"batched_matmul backward={backward!r} is unknown. Fix: 'xla' or "
                     "'cpu_transposed' (model.perf.matmul_backward, resolved).")
  dtype = jnp.result_type(a_ZxQxK, b) if dtype is None else jnp.dtype(dtype)
  return _batched_matmul(a_ZxQxK, b, transpose_b, dtype, backward)


def _bdot(a, b, a_dim: int, b_dim: int, dtype):
  """Float32 dot_general over the leading batch axes of a and b, contracting a_dim (-1 or -2)
  with b_dim.

  The batch axes are merged into one: the reshape makes XLA:CPU materialise an operand that
  is a transpose (the keys [B, L, G, K] -> [B, G, L, K], a swapped cotangent) in row-major
  layout, where a dot reading the transposed layout is upcast to float32 for bf16 operands.
  """
  acc = jnp.float32 if dtype.itemsize < 4 else None
  flat = lambda x: x.astype(dtype).reshape(-1, *x.shape[-2:])
  out = jax.lax.dot_general(flat(a), flat(b), (((a_dim % a.ndim - a.ndim + 3,),
                                                (b_dim % b.ndim - b.ndim + 3,)), ((0,), (0,))),
                            preferred_element_type=acc)
  return out.reshape(*a.shape[:-2], *out.shape[1:]).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _batched_matmul(a, b, transpose_b, dtype, backward):
  del backward
  n = a.ndim
  return _bdot(a, b, n - 1, n - 1 if transpose_b else n - 2, dtype)


def _batched_matmul_fwd(a, b, transpose_b, dtype, backward):
  return _batched_matmul(a, b, transpose_b, dtype, backward), (a, b)


def _batched_matmul_bwd(transpose_b, dtype, backward, residuals, g):
  a, b = residuals
  n = a.ndim

  def t_dot(x_ZxQxS, y_ZxQxK):
    """x^T @ y [.., s, k], contracting over q."""
    if backward == "cpu_transposed" and dtype.itemsize < 4:
      x_ZxSxQ = jnp.swapaxes(x_ZxQxS.astype(dtype), -1, -2)    # materialised by _bdot
      return _bdot(x_ZxSxQ, y_ZxQxK, n - 1, n - 2, dtype)
    return _bdot(x_ZxQxS, y_ZxQxK, n - 2, n - 2, dtype)

  if transpose_b:     # out[q, s] = sum_k a[q, k] b[s, k]
    da, db = _bdot(g, b, n - 1, n - 2, dtype), t_dot(g, a)          # g @ b, g^T @ a
  else:               # out[q, k] = sum_s a[q, s] b[s, k]
    da, db = _bdot(g, b, n - 1, n - 1, dtype), t_dot(a, g)          # g @ b^T, a^T @ g
  return da.astype(a.dtype), db.astype(b.dtype)


_batched_matmul.defvjp(_batched_matmul_fwd, _batched_matmul_bwd)
