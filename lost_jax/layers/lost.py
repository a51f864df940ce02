"""LOST decomposition: SVD split of a kernel into low-rank factors + channel-sparse complement."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax.configs import SPARSE_INITS, lost_keep
from lost_jax.layers.linear import (ACTIVATIONS, StaticIndices, _activation, check_rank,
                                    factor_params, init_kernel, random_factors)
from lost_jax.ops.matmul import matmul, matmul_appended
from lost_jax.ops.select import top_k_indices


class LostFactors(NamedTuple):
  """a [n, r], b [m, r], indices int32 [k] (sorted), values [k, m]."""
  a: jax.Array
  b: jax.Array
  indices: jax.Array
  values: jax.Array


def check_lost_shapes(n: int, m: int, rank: int, sparsity: float,
                      complement_rank: int | None = None) -> int:
  """Validate a LOST layer's settings; return k, the number of kept input channels."""
  check_rank(n, m, rank, "LOST")
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
    indices = top_k_indices(channel_scores(complement), k)
  source = complement if sparse_init == "complement" else k0
  return LostFactors(a, b, indices, source[indices])


class LOSTLinear(nnx.Module):
  """y = gamma * act(x @ a) @ b.T + (1 - gamma) * x[..., indices] @ values (LOST.md)."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, sparsity: float,
               gamma: float = 0.7, activation: str = "silu", init: str = "kaiming",
               sparse_init: str = "complement", complement_rank: int | None = None,
               factor_init: str = "svd", dtype: Any = None, param_dtype: Any = jnp.float32,
               init_std: float = 0.02,
               axes: tuple[str | None, str | None] = ("embed", "mlp"), backward: str = "xla",
               rngs: nnx.Rngs):
    if not 0.0 <= gamma <= 1.0:
      raise ValueError(f"LOST gamma={gamma} is outside [0, 1]. Fix: model.linear.gamma=0.7.")
    check_lost_shapes(in_features, out_features, rank, sparsity, complement_rank)
    self.in_features, self.out_features = in_features, out_features
    self.gamma = float(gamma)
    self.act = _activation(activation)
    self.activation = activation
    self.dtype = dtype
    self.backward = backward
    # One key from the stream whatever the variant; the ablations' extra draws fold it, so a
    # variant changes only its own layer's choice, never the init of every later layer.
    key = rngs.params()
    kernel = init_kernel(key, in_features, out_features, init, init_std)
    channel_key = jax.random.fold_in(key, 1) if sparse_init == "random_channels" else None
    f = lost_split(kernel, rank, sparsity, complement_rank=complement_rank,
                   sparse_init=sparse_init, key=channel_key)
    a, b = f.a, f.b
    if factor_init == "random":   # ablation: random factors, same shapes, CoLA's scale
      a, b = random_factors(nnx.Rngs(params=jax.random.fold_in(key, 2)), in_features,
                            out_features, rank)
    elif factor_init != "svd":
      raise ValueError(f"factor_init={factor_init!r} is unknown. Fix: 'svd' or 'random'.")
    self.a, self.b = factor_params(a, b, axes, param_dtype)
    self.indices = StaticIndices(f.indices)
    self.values = nnx.Param(f.values.astype(param_dtype), axes=(None, axes[1]))

  def __call__(self, x_BxN: jax.Array) -> jax.Array:
    # Two matmuls for both branches: the gather x[..., I] is an exact one-hot matmul appended
    # to a's columns (its backward is then a matmul, not a scatter), and the values are
    # appended to b.T's rows, so the branches are summed inside the second matmul. The extra
    # 2nk FLOPs/token are small; separate skinny gather/k-wide matmuls ran far below peak.
    # z stays float32: in bf16 the [.., r + k] elementwise math round-trips bf16 <-> f32 at
    # every op on CPU (~20% of a mixed-precision LOST step).
    rank = self.a.shape[-1]
    onehot_NxK = jax.nn.one_hot(self.indices[...], self.in_features, dtype=self.a.dtype,
                                axis=0)
    z = matmul_appended(x_BxN, self.a[...], onehot_NxK, self.dtype, out_dtype=jnp.float32,
                        backward=self.backward)
    h = lost_mix(z, rank, self.gamma, self.activation, self.dtype or jnp.float32)
    return matmul(h, jnp.concatenate([self.b[...].T, self.values[...]], axis=0), self.dtype,
                  backward=self.backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def lost_mix(z_BxW: jax.Array, rank: int, gamma: float, activation: str,
             out_dtype: Any) -> jax.Array:
  """LOST's middle: concat(gamma * act(z[..., :rank]), (1 - gamma) * z[..., rank:]) [.., W].

  Float32 math, the result cast to `out_dtype` (the second matmul's operand), in one
  elementwise pass; one custom VJP so the backward is one pass too (recomputing the sigmoid).
  Left to autodiff, the slices, concatenation, saved sigmoid and the cast were separate
  [tokens, r + k] passes (~5 per layer and direction).
  """
  z = z_BxW.astype(jnp.float32)
  col = jnp.arange(z.shape[-1]) < rank
  return jnp.where(col, gamma * ACTIVATIONS[activation](z), (1.0 - gamma) * z).astype(out_dtype)


def _lost_mix_fwd(z_BxW, rank, gamma, activation, out_dtype):
  return lost_mix(z_BxW, rank, gamma, activation, out_dtype), z_BxW


def _lost_mix_bwd(rank, gamma, activation, out_dtype, z_BxW, dh_BxW):
  del out_dtype
  z, dh = z_BxW.astype(jnp.float32), dh_BxW.astype(jnp.float32)
  if activation == "silu":
    s = jax.nn.sigmoid(z)
    d_act = s * (1.0 + z * (1.0 - s))
  elif activation == "identity":
    d_act = jnp.ones_like(z)
  else:
    raise ValueError(f"lost_mix has no derivative for activation={activation!r}.")
  col = jnp.arange(z.shape[-1]) < rank
  return (dh * jnp.where(col, gamma * d_act, 1.0 - gamma)).astype(z_BxW.dtype),


lost_mix.defvjp(_lost_mix_fwd, _lost_mix_bwd)
