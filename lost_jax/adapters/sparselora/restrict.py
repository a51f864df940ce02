"""Restricted projections. `gather` computes only the kept slices; `mask` computes densely and
zeroes the dropped channels (the oracle path, and a cross-check of the gather path)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lost_jax.ops import quant
from lost_jax.ops.select import take_cols
from lost_jax.adapters.lora import Linear, LoRALinear
from lost_jax.adapters.sparselora.select import AttnIndices
from lost_jax.models.llama import GATE_ACTIVATIONS


def _cast(lin: Linear, a: jax.Array) -> jax.Array:
  """a in the layer's compute dtype (unchanged when it has none)."""
  return a if lin.dtype is None else a.astype(lin.dtype)


def _kernel_cols(lin: Linear, idx_K: jax.Array) -> jax.Array:
  """kernel[:, idx] [n, K]; a 4-bit base dequantises only those columns."""
  return quant.kernel_cols(lin.kernel.get_value(), idx_K, lin.dtype)


def _kernel_rows(lin: Linear, idx_K: jax.Array) -> jax.Array:
  """kernel[idx, :] [K, m]; a 4-bit base dequantises only those rows."""
  return quant.kernel_rows(lin.kernel.get_value(), idx_K, lin.dtype)


def _delta(lin: Linear, x: jax.Array) -> jax.Array | None:
  return lin.delta(x) if isinstance(lin, LoRALinear) else None


def _base(lin: Linear, x: jax.Array) -> jax.Array:
  """x @ kernel in the layer's dtype; a 4-bit base is dequantised here and in the backward."""
  return quant.with_kernel(lambda x, w: _cast(lin, x) @ _cast(lin, w), x, lin.kernel.get_value())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scatter(y_BxLxK: jax.Array, idx_K: jax.Array, m: int) -> jax.Array:
  """Columns idx of a zero [..., m] array set to y (idx sorted, unique)."""
  # As a gather of [y | 0] by each output column's source (k = the zero column): XLA:CPU's
  # scatter is several times slower, and so is the scatter-add that is a gather's transpose;
  # the custom vjp keeps both directions gathers.
  k = idx_K.shape[0]
  src_M = jnp.full((m,), k, jnp.int32).at[idx_K].set(jnp.arange(k, dtype=jnp.int32))
  padded = jnp.concatenate([y_BxLxK, jnp.zeros(y_BxLxK.shape[:-1] + (1,), y_BxLxK.dtype)], -1)
  return take_cols(padded, src_M)


def _scatter_fwd(y_BxLxK, idx_K, m):
  return _scatter(y_BxLxK, idx_K, m), idx_K


def _scatter_bwd(m, idx_K, g_BxLxM):
  del m
  return take_cols(g_BxLxM, idx_K), None


_scatter.defvjp(_scatter_fwd, _scatter_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather(x_BxLxN: jax.Array, idx_K: jax.Array, n: int) -> jax.Array:
  """x[..., idx] for sorted unique idx; its transpose is `_scatter`, not a scatter-add."""
  del n
  return take_cols(x_BxLxN, idx_K)


def _gather_fwd(x_BxLxN, idx_K, n):
  return _gather(x_BxLxN, idx_K, n), idx_K


def _gather_bwd(n, idx_K, g_BxLxK):
  return _scatter(g_BxLxK, idx_K, n), None


_gather.defvjp(_gather_fwd, _gather_bwd)


def _channel_mask(idx_K: jax.Array, m: int, dtype) -> jax.Array:
  return jnp.zeros((m,), dtype).at[idx_K].set(1)


def _out_cols_base(lin: Linear, x_BxLxN: jax.Array, idx_K: jax.Array, how: str) -> jax.Array:
  m = lin.out_features
  if how == "gather":
    return _scatter(_cast(lin, x_BxLxN) @ _kernel_cols(lin, idx_K), idx_K, m)
  y = _base(lin, x_BxLxN)
  return y * _channel_mask(idx_K, m, y.dtype)


def _in_rows_base(lin: Linear, x_BxLxN: jax.Array, idx_K: jax.Array, how: str) -> jax.Array:
  if how == "gather":
    x = _gather(_cast(lin, x_BxLxN), idx_K, lin.in_features)
    return x @ _kernel_rows(lin, idx_K)
  x = _cast(lin, x_BxLxN)
  return _base(lin, x * _channel_mask(idx_K, lin.in_features, x.dtype))


def _plus_delta(y: jax.Array, lin: Linear, x: jax.Array) -> jax.Array:
  d = _delta(lin, x)
  return y if d is None else y + d


def out_cols(lin: Linear, x_BxLxN: jax.Array, idx_K: jax.Array, how: str = "gather"
             ) -> jax.Array:
  """Base restricted to output columns idx (others 0) + dense LoRA delta, [B, L, m]."""
  return _plus_delta(_out_cols_base(lin, x_BxLxN, idx_K, how), lin, x_BxLxN)


def in_rows(lin: Linear, x_BxLxN: jax.Array, idx_K: jax.Array, how: str = "gather"
            ) -> jax.Array:
  """Base restricted to input rows idx + dense LoRA delta on the full input, [B, L, m]."""
  return _plus_delta(_in_rows_base(lin, x_BxLxN, idx_K, how), lin, x_BxLxN)


def restricted_mlp(mlp, x_BxLxD: jax.Array, idx_K: jax.Array, how: str = "gather"
                   ) -> jax.Array:
  """down(act(gate(x)) * up(x)) with base channels restricted to idx, [B, L, D] (act: the
  model's gated activation, silu or gelu_tanh)."""
  gate, up, down = mlp.gate, mlp.up, mlp.down
  act_fn = GATE_ACTIVATIONS[mlp.activation]
  if how == "gather" and not isinstance(gate, LoRALinear) and not isinstance(up, LoRALinear):
    # No adapter feeds the intermediate: it is exactly zero off idx, so stay compact.
    g = _cast(gate, x_BxLxD) @ _kernel_cols(gate, idx_K)
    u = _cast(up, x_BxLxD) @ _kernel_cols(up, idx_K)
    act = act_fn(g) * u
    y = _cast(down, act) @ _kernel_rows(down, idx_K)
    if isinstance(down, LoRALinear):
      y = y + down.delta(_scatter(act, idx_K, down.in_features))
    return y
  act = act_fn(out_cols(gate, x_BxLxD, idx_K, how)) * out_cols(up, x_BxLxD, idx_K, how)
  return in_rows(down, act, idx_K, how)


def _split(x_BxLxD: jax.Array, n_sparse: int):
  """(x[:, :n_sparse], x[:, n_sparse:]); as one split, whose transpose is one concatenate
  (two slices would transpose to two full-length pads and their sum)."""
  return tuple(jax.lax.split(x_BxLxD, [n_sparse, x_BxLxD.shape[1] - n_sparse], axis=1))


def _join(sparse, dense):
  parts = [p for p in (sparse, dense) if p is not None and p.shape[1]]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def sparse_mlp(mlp, x_BxLxD: jax.Array, idx_K: jax.Array | None, n_sparse: int,
               how: str = "gather", block_grad: bool = False) -> jax.Array:
  """MLP with tokens [:n_sparse] restricted to idx and the rest dense, [B, L, D].

  block_grad: no input gradient through the restricted tokens' MLP (also through their
  gate / up / down adapters, if any: the default targets have none there).
  """
  if idx_K is None or n_sparse == 0:
    return mlp(x_BxLxD)
  xs, xd = _split(x_BxLxD, n_sparse)
  xs = jax.lax.stop_gradient(xs) if block_grad else xs
  return _join(restricted_mlp(mlp, xs, idx_K, how), mlp(xd) if xd.shape[1] else None)


def _dense_base(lin: Linear, x: jax.Array) -> jax.Array:
  return lin.base(x) if isinstance(lin, LoRALinear) else lin(x)


def restricted_projection(name: str, lin: Linear, x_BxLxN: jax.Array,
                          bias_M: jax.Array | None = None, *, idx: AttnIndices,
                          n_sparse: int, how: str = "gather", block_grad: bool = False
                          ) -> jax.Array:
  """q/k/v (kept output columns) or o (kept input rows) restricted on tokens [:n_sparse].

  The base runs restricted on the context and full on the suffix; the LoRA delta runs once
  over all tokens (one adapter matmul chain per projection, not one per token group). A q/k/v
  output bias is restricted with its columns: the context keeps the kept channels' biases.
  block_grad: no input gradient through the context's restricted base (the delta keeps it).
  """
  xs, xd = _split(x_BxLxN, n_sparse)
  xs = jax.lax.stop_gradient(xs) if block_grad else xs
  if name == "o":
    sparse = _in_rows_base(lin, xs, idx.o, how)
  else:
    cols = getattr(idx, name)
    sparse = _out_cols_base(lin, xs, cols, how)
    if bias_M is not None:
      sparse = sparse + (bias_M * _channel_mask(cols, lin.out_features, bias_M.dtype)
                         ).astype(sparse.dtype)
  dense = None
  if xd.shape[1]:
    dense = _dense_base(lin, xd)
    dense = dense if bias_M is None else dense + bias_M.astype(dense.dtype)
  return _plus_delta(_join(sparse, dense), lin, x_BxLxN)
