"""Projection layers: dense, LOST (low-rank + channel-sparse), low-rank/CoLA and SLTrain.

Every layer maps x [..., n] -> y [..., m] with kernels stored in -> out (y = x @ K). Params are
stored in `param_dtype` and cast to the compute `dtype` at call time. Each nnx.Param carries
logical `axes` metadata that `lost_jax.sharding` maps to mesh axes. Index sets live in
`StaticIndices`, a non-trainable variable: gradients, optimizer state and weight decay never
see them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax import quant
from lost_jax.lost import check_lost_shapes, lost_split

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


class DenseLinear(nnx.Module):
  """y = x @ kernel, kernel [n, m] ~ N(0, init_std)."""

  def __init__(self, in_features: int, out_features: int, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, init_std: float = 0.02,
               axes: tuple[str | None, str | None] = ("embed", "mlp"), backward: str = "xla",
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.backward = backward
    kernel = init_kernel(rngs.params(), in_features, out_features, "normal", init_std)
    self.kernel = nnx.Param(kernel.astype(param_dtype), axes=axes)

  def __call__(self, x_BxN: jax.Array) -> jax.Array:
    mm = lambda x, w: matmul(x, w, self.dtype, backward=self.backward)
    kernel = self.kernel.get_value()
    if isinstance(kernel, quant.NF4Weight):    # a frozen 4-bit base (init.quantize=nf4)
      return quant.with_dequantized(mm, x_BxN, kernel)
    return mm(x_BxN, self.kernel[...])


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
    z = matmul(x_BxN, jnp.concatenate([self.a[...], onehot_NxK], axis=1), self.dtype,
               out_dtype=jnp.float32, backward=self.backward)
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


def _check_rank(n: int, m: int, rank: int, kind: str):
  if not isinstance(rank, int) or not 1 <= rank <= min(n, m):
    raise ValueError(f"{kind} rank={rank} is impossible for a {n}x{m} kernel. "
                     f"Fix: choose model.linear.rank in 1..{min(n, m)}.")


class LowRankLinear(nnx.Module):
  """y = act(x @ a) @ b.T with random factors: plain low-rank (identity) or CoLA (silu)."""

  def __init__(self, in_features: int, out_features: int, *, rank: int,
               activation: str = "identity", dtype: Any = None,
               param_dtype: Any = jnp.float32,
               axes: tuple[str | None, str | None] = ("embed", "mlp"), backward: str = "xla",
               rngs: nnx.Rngs):
    _check_rank(in_features, out_features, rank, "low-rank")
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
    _check_rank(in_features, out_features, rank, "SLTrain")
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


def make_linear(lin, n: int, m: int, *, axes, dtype, param_dtype, init_std: float,
                backward: str = "xla", rngs: nnx.Rngs) -> nnx.Module:
  """Build the projection chosen by `lin.kind` (a `model.linear` ConfigDict)."""
  common = dict(dtype=dtype, param_dtype=param_dtype, axes=axes, backward=backward, rngs=rngs)
  if lin.kind == "dense":
    return DenseLinear(n, m, init_std=init_std, **common)
  if lin.kind == "lost":
    return LOSTLinear(n, m, rank=lin.rank, sparsity=lin.sparsity, gamma=lin.gamma,
                      activation=lin.activation, init=lin.init, sparse_init=lin.sparse_init,
                      complement_rank=lin.complement_rank or None,
                      factor_init=lin.factor_init, init_std=init_std, **common)
  if lin.kind in ("low_rank", "cola"):
    activation = "silu" if lin.kind == "cola" else lin.activation
    return LowRankLinear(n, m, rank=lin.rank, activation=activation, **common)
  if lin.kind == "sltrain":
    return SLTrainLinear(n, m, rank=lin.rank, density=lin.density, alpha=lin.alpha, **common)
  raise ValueError(f"model.linear.kind={lin.kind!r} is unknown. Fix: use one of "
                   "dense, lost, low_rank, cola, sltrain.")
