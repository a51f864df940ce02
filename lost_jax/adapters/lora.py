"""LoRA adapters on a frozen Llama: `LoRAParam`, `LoRALinear`, `apply_lora`, `merge_lora`.

y = x @ kernel + (alpha / r) * dropout(x) @ lora_a @ lora_b, kernel [n, m] frozen,
lora_a [n, r] ~ U(+-1/sqrt(n)) (PyTorch/PEFT kaiming-uniform with a = sqrt(5)), lora_b [r, m] = 0.
The base kernel keeps the state path and type of `DenseLinear.kernel` (an nnx.Param), so base
checkpoints load unchanged; adapters are `LoRAParam`, an nnx.Param subclass, so
`nnx.state(model, LoRAParam)` / `nnx.DiffState(0, LoRAParam)` select the adapters only and
`nnx.All(nnx.Param, nnx.Not(LoRAParam))` selects the frozen rest.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax.ops import quant
from lost_jax.layers.linear import DenseLinear, check_rank, init_kernel
from lost_jax.models.llama import (ATTN_PROJECTIONS, MLP_PROJECTIONS, projection,
                                    projection_owner)
from lost_jax.ops.matmul import transposed_tokens

BASE_QUANTIZE = ("none", "nf4")


class LoRAParam(nnx.Param):
  """LoRA adapter factor: the only parameters a LoRA / SparseLoRA step differentiates."""


def _axes(var: nnx.Variable) -> tuple:
  return tuple(var.get_metadata().get("axes") or (None, None))


def lora_delta(x_BxN: jax.Array, a_NxR: jax.Array, b_RxM: jax.Array, scale: float,
               backward: str = "xla") -> jax.Array:
  """scale * x @ a @ b [..., m]; the scale multiplies the rank-r intermediate.

  backward='xla' leaves the backward to XLA. backward='cpu_transposed' (XLA:CPU targets)
  computes the factor gradients as (u^T @ x)^T and u^T @ g from the small [T, r]
  intermediates, transposed behind optimisation barriers: XLA:CPU would otherwise
  materialise x^T [n, T] and the cotangent's transpose [m, T] with slow strided copies
  (~5% of a LoRA step at 512 tokens).
  """
  if backward == "cpu_transposed":
    return _lora_delta_cpu(x_BxN, a_NxR, b_RxM, scale)
  return ((x_BxN @ a_NxR) * scale) @ b_RxM


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_delta_cpu(x_BxN, a_NxR, b_RxM, scale):
  return ((x_BxN @ a_NxR) * scale) @ b_RxM


def _lora_delta_fwd(x_BxN, a_NxR, b_RxM, scale):
  us = (x_BxN @ a_NxR) * scale
  return us @ b_RxM, (x_BxN, a_NxR, b_RxM, us)


def _lora_delta_bwd(scale, residuals, g_BxM):
  x_BxN, a_NxR, b_RxM, us_BxR = residuals
  n, r, m = a_NxR.shape[0], a_NxR.shape[1], b_RxM.shape[1]
  x_TxN, g_TxM = x_BxN.reshape(-1, n), g_BxM.reshape(-1, m).astype(b_RxM.dtype)
  us_TxR = us_BxR.reshape(-1, r)
  du_TxR = jax.lax.dot_general(g_TxM, b_RxM, (((1,), (1,)), ((), ()))) * scale
  db_RxM = transposed_tokens(us_TxR) @ g_TxM
  da_RxN = jax.lax.optimization_barrier(transposed_tokens(du_TxR) @ x_TxN)
  dx = jax.lax.dot_general(du_TxR, a_NxR, (((1,), (1,)), ((), ())))
  return (dx.reshape(x_BxN.shape).astype(x_BxN.dtype), da_RxN.T.astype(a_NxR.dtype),
          db_RxM.astype(b_RxM.dtype))


_lora_delta_cpu.defvjp(_lora_delta_fwd, _lora_delta_bwd)


class LoRALinear(nnx.Module):
  """y = x @ kernel (frozen) + scale * dropout(x) @ lora_a @ lora_b; scale = alpha / rank."""

  def __init__(self, base: DenseLinear, *, rank: int, alpha: float, dropout: float = 0.0,
               param_dtype=None, rngs: nnx.Rngs):
    n, m = base.in_features, base.out_features
    check_rank(n, m, rank, "LoRA", "lora.rank")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"LoRA dropout={dropout} is outside [0, 1). Fix: use e.g. 0.0 or 0.05.")
    self.in_features, self.out_features = n, m
    self.dtype = base.dtype
    self.backward = base.backward
    self.rank = rank
    self.scale = float(alpha) / rank
    self.kernel = base.kernel               # same Variable: the frozen base weight.
    in_axis, out_axis = _axes(base.kernel)
    # Adapters in param_dtype (float32 under mixed precision) over a possibly bf16 base.
    pdt = base.kernel[...].dtype if param_dtype is None else jnp.dtype(param_dtype)
    self.lora_a = LoRAParam(init_kernel(rngs.params(), n, rank, "kaiming").astype(pdt),
                            axes=(in_axis, "rank"))
    self.lora_b = LoRAParam(jnp.zeros((rank, m), pdt), axes=("rank", out_axis))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def base(self, x_BxN: jax.Array) -> jax.Array:
    """Frozen projection x @ kernel [..., m]."""
    def mm(x, kernel):
      if self.dtype is not None:
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
      return x @ kernel
    # The kernel may be a frozen 4-bit base (init.quantize=nf4).
    return quant.with_kernel(mm, x_BxN, self.kernel.get_value())

  def delta(self, x_BxN: jax.Array) -> jax.Array:
    """Adapter branch scale * dropout(x) @ a @ b [..., m] (always dense over all channels)."""
    a, b = self.lora_a[...], self.lora_b[...]
    if self.dtype is not None:
      x_BxN, a, b = x_BxN.astype(self.dtype), a.astype(self.dtype), b.astype(self.dtype)
    if self.dropout is not None:
      x_BxN = self.dropout(x_BxN)
    return lora_delta(x_BxN, a, b, self.scale, self.backward)

  def __call__(self, x_BxN: jax.Array) -> jax.Array:
    return self.base(x_BxN) + self.delta(x_BxN)


Linear = DenseLinear | LoRALinear     # a frozen base projection, with or without an adapter


def quantize_base(model, how: str = "nf4"):
  """Store every block projection kernel of a frozen Llama as NF4, in place; returns model.

  Embedding and LM head stay in their dtype (as QLoRA). Call before `apply_lora` (the
  adapters share the kernel variable, so they see the same NF4 value).
  """
  if how not in BASE_QUANTIZE:
    raise ValueError(f"config.init.quantize={how!r} is unknown. Fix: use one of "
                     f"{BASE_QUANTIZE}.")
  if how == "none":
    return model
  for _, node in nnx.iter_graph(model.layers):
    if isinstance(node, DenseLinear):
      node.kernel.set_value(quant.as_nf4(node.kernel.get_value()))
  return model


def apply_lora(model, targets: Sequence[str] = ATTN_PROJECTIONS, rank: int = 32,
               alpha: float = 64.0, dropout: float = 0.0, *, param_dtype=None,
               rngs: nnx.Rngs):
  """Wrap the target projections of every block in LoRALinear, in place; returns model."""
  targets = tuple(targets)
  if not targets or len(set(targets)) != len(targets):
    raise ValueError(f"LoRA targets={targets} must be non-empty and distinct.")
  for block in model.layers:
    for t in targets:
      owner = projection_owner(block, t)
      base = getattr(owner, t)
      if not isinstance(base, DenseLinear):
        raise ValueError(f"LoRA on {t!r} needs a DenseLinear base, found "
                         f"{type(base).__name__}. Fix: fine-tune a dense model "
                         "(model.linear.kind='dense'), or merge LOST factors first.")
      setattr(owner, t, LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout,
                                   param_dtype=param_dtype, rngs=rngs))
  return model


def merged_kernel(lin: LoRALinear) -> jax.Array:
  """kernel + scale * a @ b, summed in float32 and stored in the kernel's dtype [n, m]."""
  k = lin.kernel[...]
  delta = lin.lora_a[...].astype(jnp.float32) @ lin.lora_b[...].astype(jnp.float32)
  return (k.astype(jnp.float32) + lin.scale * delta).astype(k.dtype)


def _dense_from(kernel: jax.Array, lin: LoRALinear) -> DenseLinear:
  # Built abstractly so no throw-away random kernel is materialised, then given the real one.
  dense = nnx.eval_shape(lambda: DenseLinear(lin.in_features, lin.out_features,
                                             dtype=lin.dtype, param_dtype=kernel.dtype,
                                             axes=_axes(lin.kernel), backward=lin.backward,
                                             rngs=nnx.Rngs(0)))
  dense.kernel = nnx.Param(kernel, axes=_axes(lin.kernel))
  return dense


def merge_lora(model):
  """Fold every adapter into its base kernel and restore plain DenseLinear, in place."""
  for block in model.layers:
    for t in ATTN_PROJECTIONS + MLP_PROJECTIONS:
      owner = projection_owner(block, t)
      lin = getattr(owner, t)
      if isinstance(lin, LoRALinear):
        setattr(owner, t, _dense_from(merged_kernel(lin), lin))
  return model


def lora_targets(model) -> tuple[str, ...]:
  """Names of the projections carrying adapters (the same in every block)."""
  block = model.layers[0]
  return tuple(t for t in ATTN_PROJECTIONS + MLP_PROJECTIONS
               if isinstance(projection(block, t), LoRALinear))
