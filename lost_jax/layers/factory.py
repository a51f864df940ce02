"""The projection factory: one layer class per `model.linear.kind`."""

from __future__ import annotations

from flax import nnx

from lost_jax.layers.linear import DenseLinear, LowRankLinear, SLTrainLinear
from lost_jax.layers.lost import LOSTLinear


def make_linear(lin, n: int, m: int, *, axes, dtype, param_dtype, init_std: float,
                backward: str = "xla", rngs: nnx.Rngs) -> nnx.Module:
  """Build the projection chosen by `lin.kind` (a `model.linear` ConfigDict)."""
  common = dict(dtype=dtype, param_dtype=param_dtype, axes=axes, backward=backward, rngs=rngs)
  if lin.kind == "dense":
    # A config saved before dense_init existed drew its dense kernels N(0, init_std).
    return DenseLinear(n, m, init_std=init_std, init=lin.get("dense_init", "normal"), **common)
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
