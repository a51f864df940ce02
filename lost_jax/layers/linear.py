"""Projection layers: dense, LOST (low-rank + channel-sparse), low-rank/CoLA and SLTrain.

Every layer maps x [..., n] -> y [..., m] with kernels stored in -> out (y = x @ K). Params are
stored in `param_dtype` and cast to the compute `dtype` at call time. Each nnx.Param carries
logical `axes` metadata that `lost_jax.sharding` maps to mesh axes. Index sets live in
`StaticIndices`, a non-trainable variable: gradients, optimizer state and weight decay never
see them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax.ops import quant
from lost_jax.ops.matmul import _cast, matmul

ACTIVATIONS = {"silu": jax.nn.silu, "identity": lambda x: x}


class StaticIndices(nnx.Variable):
  """Fixed int32 index set (LOST channels, SLTrain support): saved, replicated, never trained."""


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r} is unknown. Fix: use one of {tuple(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def init_kernel(key: jax.Array, n: int, m: int, init: str, std: float = 0.02) -> jax.Array:
  """Full-rank float32 kernel [n, m]: `kaiming` (PyTorch Linear default, U(+-1/sqrt(n))) or `normal`."""
  if init == "kaiming":
    bound = 1.0 / math.sqrt(n)
    return jax.random.uniform(key, (n, m), jnp.float32, -bound, bound)
  if init == "normal":
    return std * jax.random.normal(key, (n, m), jnp.float32)
  raise ValueError(f"init={init!r} is unknown. Fix: use 'kaiming' or 'normal'.")


class DenseLinear(nnx.Module):
  """y = x @ kernel, kernel [n, m] ~ N(0, init_std) (`init` normal) or U(+-1/sqrt(n))
  (`init` kaiming: the weight a LOST layer drawing the same key decomposes)."""

  def __init__(self, in_features: int, out_features: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, init_std: float = 0.02, init: str = "normal",
               axes: tuple[str | None, str | None] = ("embed", "mlp"), backward: str = "xla",
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.backward = backward
    kernel = init_kernel(rngs.params(), in_features, out_features, init, init_std)
    self.kernel = nnx.Param(kernel.astype(param_dtype), axes=axes)

  def __call__(self, x_BxN: jax.Array) -> jax.Array:
    mm = lambda x, w: matmul(x, w, self.dtype, backward=self.backward)
    # The kernel may be a frozen 4-bit base (init.quantize=nf4).
    return quant.with_kernel(mm, x_BxN, self.kernel.get_value())


def random_factors(rngs: nnx.Rngs, n: int, m: int, rank: int) -> tuple[jax.Array, jax.Array]:
  """CoLA's init: a [n, r], b [m, r] ~ N(0, (r (n + m))^(-1/2)) each (float32)."""
  std = (rank * (n + m)) ** -0.25
  return (std * jax.random.normal(rngs.params(), (n, rank)),
          std * jax.random.normal(rngs.params(), (m, rank)))


def factor_params(a_NxR: jax.Array, b_MxR: jax.Array, axes: tuple[str | None, str | None],
                  param_dtype: Any) -> tuple[nnx.Param, nnx.Param]:
  """Factors a [n, r] and b [m, r] as parameters, sharded like the kernel's (in, out) axes."""
  in_axis, out_axis = axes
  return (nnx.Param(a_NxR.astype(param_dtype), axes=(in_axis, "rank")),
          nnx.Param(b_MxR.astype(param_dtype), axes=(out_axis, "rank")))


def check_rank(n: int, m: int, rank: int, kind: str, setting: str = "model.linear.rank"):
  """Raise unless rank is an int in 1..min(n, m) for an [n, m] kernel (kind, setting: named)."""
  if not isinstance(rank, int) or not 1 <= rank <= min(n, m):
    raise ValueError(f"{kind} rank={rank} is impossible for a {n}x{m} kernel. "
                     f"Fix: choose {setting} in 1..{min(n, m)}.")


class LowRankLinear(nnx.Module):
  """y = act(x @ a) @ b.T with random factors: plain low-rank (identity) or CoLA (silu)."""

  def __init__(self, in_features: int, out_features: int, *, rank: int,
               activation: str = "identity", dtype: Any = None,
               param_dtype: Any = jnp.float32,
               axes: tuple[str | None, str | None] = ("embed", "mlp"), backward: str = "xla",
               rngs: nnx.Rngs):
    check_rank(in_features, out_features, rank, "low-rank")
    self.in_features, self.out_features = in_features, out_features
    self.act = _activation(activation)
    self.dtype = dtype
    self.backward = backward
    self.a, self.b = factor_params(*random_factors(rngs, in_features, out_features, rank), axes,
                                   param_dtype)

  def __call__(self, x_BxN: jax.Array) -> jax.Array:
    h = self.act(matmul(x_BxN, self.a[...], self.dtype, out_dtype=jnp.float32,
                        backward=self.backward))  # as LOST
    return matmul(h, self.b[...].T, self.dtype, backward=self.backward)


def sltrain_support(key: jax.Array, n: int, m: int, density: float) -> jax.Array:
  """Sorted, distinct int32 flat indices into an [n, m] kernel, round(density * n * m) of them."""
  nnz = max(1, round(density * n * m))
  return jnp.sort(jax.random.choice(key, n * m, (nnz,), replace=False)).astype(jnp.int32)


class SLTrainLinear(nnx.Module):
  """y = x @ (a @ b.T * alpha / r + S), S zero but for a fixed random support of trained values."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, density: float = 0.03,
               alpha: float = 32.0, dtype: Any = None, param_dtype: Any = jnp.float32,
               axes: tuple[str | None, str | None] = ("embed", "mlp"), backward: str = "xla",
               rngs: nnx.Rngs):
    check_rank(in_features, out_features, rank, "SLTrain")
    if not 0.0 < density <= 1.0:
      raise ValueError(f"SLTrain density={density} is outside (0, 1]. "
                       "Fix: model.linear.density=0.03.")
    self.in_features, self.out_features = in_features, out_features
    self.scale = float(alpha) / rank
    self.dtype = dtype
    self.backward = backward
    self.a, self.b = factor_params(*random_factors(rngs, in_features, out_features, rank), axes,
                                   param_dtype)
    self.indices = StaticIndices(sltrain_support(rngs.params(), in_features, out_features,
                                                 density))
    bound = 1.0 / math.sqrt(in_features)
    values = jax.random.uniform(rngs.params(), self.indices.shape, jnp.float32, -bound, bound)
    self.values = nnx.Param(values.astype(param_dtype), axes=(None,))

  def __call__(self, x_BxN: jax.Array) -> jax.Array:
    a, b, values = _cast(self.dtype, self.a[...], self.b[...], self.values[...])
    n, m = self.in_features, self.out_features
    # The support is static, so the scatter has a fixed shape; grads reach values by gather.
    sparse = jnp.zeros((n * m,), values.dtype).at[self.indices[...]].set(
        values, indices_are_sorted=True, unique_indices=True).reshape(n, m)
    return matmul(x_BxN, self.scale * (a @ b.T) + sparse, self.dtype, backward=self.backward)


