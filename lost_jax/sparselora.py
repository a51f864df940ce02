"""SparseLoRA: contextual channel sparsity of the frozen base projections during LoRA training.

Per layer and step, an index set of base channels is chosen for the whole micro-batch, from a
rank-8 SVD estimator of the frozen kernels (`mode='svd'`) or, for accuracy studies only, from
the true activations (`mode='oracle'`). Context tokens (the sparse prefix of a left-padded
batch) use only those channels of the base kernels, forward and backward; the dense suffix
(every token with a loss) and the LoRA branch stay dense (SparseLoRA, arXiv 2506.16500).

Semantics (what "restricted" means everywhere below and in the tests): for sparse tokens each
base kernel is replaced by a masked copy — gate/up/q/k/v keep only the selected OUTPUT
columns, down/o only the selected INPUT rows — while LoRA adapters are unchanged. The gather
path computes exactly that with smaller matmuls (gathered kernel columns/rows); q/k/v
outputs are scattered back to full width (zeros elsewhere, as in the reference), the dense
LoRA delta is added, then RoPE and attention run dense over all tokens and all head dims.

Channel scores:
- FFN: x_bar = mean of the normed hidden state over the valid sparse-prefix tokens of each
  sequence [B, D]; score_j = || silu(x_bar P_g Q_g)_j * (x_bar P_u Q_u)_j ||_2 over the batch.
- attention (all valid sparse-prefix tokens, no averaging): per-column norms ||y[:, c]||_2
  of y = x P Q (computed exactly through the r x r Gram matrix of x P, so [N, m] estimates are
  never materialised). kv channel (kv head j, dim d):
    qk_score(j, d) = ||k(j, d)|| * sqrt(sum_{h in group j} ||q(h, d)||^2),  v_score = ||v(j, d)||
  (group j = query heads j*G .. j*G+G-1, G = H / KV; G = 1 is the paper's per-channel rule).
  Keeping (j, d) keeps q column (h, d) and o input row (h, d) for every h in group j (q from
  the qk choice, o from the v choice), k_kv = int(KV*hd*(1-s)) and k_q = G * k_kv.
  Deliberate difference from the reference code: its GQA arithmetic averages q over
  `view(G, KV*hd)` (query heads of DIFFERENT kv groups), maps kv channel c to query columns
  c*G + r, and indexes o's H*hd input with kv-sized v indices. We use the mapping above;
  tests/test_sparselora.py pins it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from lost_jax.configs import parse_layer_sparsity
import numpy as np
from flax import nnx

from lost_jax import quant
from lost_jax.layers import DenseLinear
from lost_jax.lora import LoRALinear
from lost_jax.model import dense_projection

EST_MODULES = ("gate", "up", "q", "k", "v")
MODES = ("svd", "oracle", "random")   # random: the ablation of the estimator
Linear = DenseLinear | LoRALinear


# ----------------------------------------------------------------------------------------------
# Offline SVD estimator.


def svd_estimator(kernel_NxM: jax.Array, rank: int = 8) -> tuple[jax.Array, jax.Array]:
  """Float32 factors (P [n, r] = U_r sqrt(s_r), Q [r, m] = sqrt(s_r) V_r^T), K ~= P @ Q."""
  n, m = kernel_NxM.shape
  if not 1 <= rank <= min(n, m):
    raise ValueError(f"estimator rank={rank} is impossible for a {n}x{m} kernel. "
                     f"Fix: use a rank in 1..{min(n, m)} (the paper uses 8).")
  u, s, vt = jnp.linalg.svd(kernel_NxM.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def layer_key(i: int) -> str:
  return f"layer_{i}"


def _proj(block, name: str) -> Linear:
  return getattr(block.mlp if name in ("gate", "up", "down") else block.attn, name)


def _base_kernel(lin) -> jax.Array:
  if not isinstance(lin, (DenseLinear, LoRALinear)):
    raise ValueError(f"SparseLoRA needs dense base projections, found {type(lin).__name__}. "
                     "Fix: fine-tune a model with model.linear.kind='dense'.")
  return lin.kernel[...]


def build_estimators(model, rank: int = 8, layers: Sequence[int] | None = None) -> dict:
  """{'layer_i': {m: {'p': [n, r], 'q': [r, m']}} for m in gate, up, q, k, v} (float32)."""
  layers = range(len(model.layers)) if layers is None else layers
  est = {}
  for i in layers:
    block = model.layers[i]
    est[layer_key(i)] = {}
    for name in EST_MODULES:
      p, q = svd_estimator(_base_kernel(_proj(block, name)), rank)
      est[layer_key(i)][name] = {"p": p, "q": q}
  return est


def estimator_mismatch(kernel_NxM: jax.Array, p_NxR: jax.Array, q_RxM: jax.Array) -> float:
  """Relative error of P^T K Q^T against diag(s)^2: ~1e-6 iff (P, Q) is this kernel's SVD."""
  k = kernel_NxM.astype(jnp.float32)
  s = jnp.sum(p_NxR * p_NxR, axis=0)                    # P^T P = diag(s)
  got = p_NxR.T @ k @ q_RxM.T                            # = diag(s)^2 for the true factors
  return float(jnp.linalg.norm(got - jnp.diag(s * s)) / jnp.linalg.norm(s * s))


def save_estimators(path: str, est: dict) -> None:
  """Store estimator factors as one .npz (keys 'layer_i/module/p|q' plus a JSON header)."""
  arrays = {}
  for lk, mods in est.items():
    for name, f in mods.items():
      for which in ("p", "q"):
        arrays[f"{lk}/{name}/{which}"] = np.asarray(f[which], np.float32)
  ranks = {a.shape[1] for k, a in arrays.items() if k.endswith("/p")}
  header = {"format": "sparselora_estimators/1", "rank": sorted(ranks)}
  with open(path, "wb") as fh:
    np.savez(fh, __header__=np.asarray(json.dumps(header)), **arrays)


def load_estimators(path: str, model=None, rank: int | None = None,
                    verify: bool = True, tol: float = 1e-3) -> dict:
  """Reload `save_estimators` output; with `model`, check shapes (and factors if verify)."""
  with np.load(path) as data:
    header = json.loads(str(data["__header__"]))
    est: dict = {}
    for key in data.files:
      if key == "__header__":
        continue
      lk, name, which = key.split("/")
      est.setdefault(lk, {}).setdefault(name, {})[which] = jnp.asarray(data[key])
  if header.get("format") != "sparselora_estimators/1":
    raise ValueError(f"{path}: not a SparseLoRA estimator file (header {header}).")
  if rank is not None and header["rank"] != [rank]:
    raise ValueError(f"{path}: estimator rank {header['rank']} != requested {rank}. "
                     "Fix: rebuild with build_estimators(model, rank).")
  if model is not None:
    for lk, mods in est.items():
      i = int(lk.split("_")[1])
      if i >= len(model.layers):
        raise ValueError(f"{path}: has {lk} but the model has {len(model.layers)} layers. "
                         "Fix: rebuild the estimators for this model.")
      for name, f in mods.items():
        kernel = _base_kernel(_proj(model.layers[i], name))
        n, m = kernel.shape
        if f["p"].shape[0] != n or f["q"].shape[1] != m:
          raise ValueError(f"{path}: {lk}/{name} factors {f['p'].shape} x {f['q'].shape} do "
                           f"not fit the {n}x{m} kernel. Fix: rebuild the estimators.")
        if verify:
          err = estimator_mismatch(kernel, f["p"], f["q"])
          if err > tol:
            raise ValueError(f"{path}: {lk}/{name} factors are not the SVD of this model's "
                             f"kernel (mismatch {err:.2e} > {tol}). Fix: rebuild the "
                             "estimators from the base checkpoint being fine-tuned.")
  return est


# ----------------------------------------------------------------------------------------------
# Channel scores and selection (pure; k static).


def keep_count(n: int, sparsity: float) -> int:
  """Channels kept, int(n * (1 - sparsity)) (robust to float rounding), at least 1."""
  return max(1, int(math.floor(n * (1.0 - sparsity) + 1e-6)))


def top_k_indices(score_N: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest scores, sorted ascending, int32 [k]."""
  _, idx = jax.lax.top_k(score_N, k)
  return jnp.sort(idx).astype(jnp.int32)


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
               est_up: dict) -> jax.Array:
  """score_j = ||silu(x_bar P_g Q_g)_j * (x_bar P_u Q_u)_j||_2 over the batch, [F]."""
  x_bar = masked_mean(x_BxLxD, mask_BxL)
  g = (x_bar @ est_gate["p"]) @ est_gate["q"]
  u = (x_bar @ est_up["p"]) @ est_up["q"]
  act = jax.nn.silu(g) * u
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


# ----------------------------------------------------------------------------------------------
# Restricted projections. `gather` computes only the kept slices; `mask` computes densely and
# zeroes the dropped channels (the oracle path, and a cross-check of the gather path).


def _kernel(lin: Linear) -> jax.Array:
  k = lin.kernel[...]
  return k if lin.dtype is None else k.astype(lin.dtype)


def _kernel_cols(lin: Linear, idx_K: jax.Array) -> jax.Array:
  """kernel[:, idx] [n, K]; a 4-bit base (quant.NF4Weight) dequantises only those columns."""
  k = lin.kernel.get_value()
  if isinstance(k, quant.NF4Weight):
    return k.take_cols(idx_K).astype(lin.dtype or k.dtype)
  return _take_cols(_kernel(lin), idx_K)


def _kernel_rows(lin: Linear, idx_K: jax.Array) -> jax.Array:
  """kernel[idx, :] [K, m]; a 4-bit base dequantises only those rows."""
  k = lin.kernel.get_value()
  if isinstance(k, quant.NF4Weight):
    return k.take_rows(idx_K).astype(lin.dtype or k.dtype)
  return jnp.take(_kernel(lin), idx_K, axis=0, mode="clip", unique_indices=True,
                  indices_are_sorted=True)


def _x(lin: Linear, x: jax.Array) -> jax.Array:
  return x if lin.dtype is None else x.astype(lin.dtype)


def _delta(lin: Linear, x: jax.Array) -> jax.Array | None:
  return lin.delta(x) if isinstance(lin, LoRALinear) else None


def _base(lin: Linear, x: jax.Array) -> jax.Array:
  k = lin.kernel.get_value()
  if isinstance(k, quant.NF4Weight):   # dequantised again in the backward, not kept
    return quant.with_dequantized(lambda x, w: _x(lin, x) @ w.astype(lin.dtype or w.dtype),
                                  x, k)
  return _x(lin, x) @ _kernel(lin)


def _take_cols(a_XxN: jax.Array, idx_K: jax.Array) -> jax.Array:
  """a[..., idx] [..., K]: as take_along_axis, XLA:CPU writes the result row-major in place,
  where jnp.take(axis=-1) gathers whole columns and transposes them (~2x slower matmuls).
  Indices are in range by construction (top-k positions): no out-of-range fill pass."""
  return jnp.take_along_axis(a_XxN, jnp.broadcast_to(idx_K, a_XxN.shape[:-1] + idx_K.shape),
                             axis=-1, mode="promise_in_bounds")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scatter(y_BxLxK: jax.Array, idx_K: jax.Array, m: int) -> jax.Array:
  """Columns idx of a zero [..., m] array set to y (idx sorted, unique)."""
  # As a gather of [y | 0] by each output column's source (k = the zero column): XLA:CPU's
  # scatter is several times slower, and so is the scatter-add that is a gather's transpose;
  # the custom vjp keeps both directions gathers.
  k = idx_K.shape[0]
  src_M = jnp.full((m,), k, jnp.int32).at[idx_K].set(jnp.arange(k, dtype=jnp.int32))
  padded = jnp.concatenate([y_BxLxK, jnp.zeros(y_BxLxK.shape[:-1] + (1,), y_BxLxK.dtype)], -1)
  return _take_cols(padded, src_M)


def _scatter_fwd(y_BxLxK, idx_K, m):
  return _scatter(y_BxLxK, idx_K, m), idx_K


def _scatter_bwd(m, idx_K, g_BxLxM):
  del m
  return _take_cols(g_BxLxM, idx_K), None


_scatter.defvjp(_scatter_fwd, _scatter_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather(x_BxLxN: jax.Array, idx_K: jax.Array, n: int) -> jax.Array:
  """x[..., idx] for sorted unique idx; its transpose is `_scatter`, not a scatter-add."""
  del n
  return _take_cols(x_BxLxN, idx_K)


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
    return _scatter(_x(lin, x_BxLxN) @ _kernel_cols(lin, idx_K), idx_K, m)
  y = _base(lin, x_BxLxN)
  return y * _channel_mask(idx_K, m, y.dtype)


def _in_rows_base(lin: Linear, x_BxLxN: jax.Array, idx_K: jax.Array, how: str) -> jax.Array:
  if how == "gather":
    x = _gather(_x(lin, x_BxLxN), idx_K, lin.in_features)
    return x @ _kernel_rows(lin, idx_K)
  x = _x(lin, x_BxLxN)
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
  """down(silu(gate(x)) * up(x)) with base channels restricted to idx, [B, L, D]."""
  gate, up, down = mlp.gate, mlp.up, mlp.down
  if how == "gather" and not isinstance(gate, LoRALinear) and not isinstance(up, LoRALinear):
    # No adapter feeds the intermediate: it is exactly zero off idx, so stay compact.
    g = _x(gate, x_BxLxD) @ _kernel_cols(gate, idx_K)
    u = _x(up, x_BxLxD) @ _kernel_cols(up, idx_K)
    act = jax.nn.silu(g) * u
    y = _x(down, act) @ _kernel_rows(down, idx_K)
    if isinstance(down, LoRALinear):
      y = y + down.delta(_scatter(act, idx_K, down.in_features))
    return y
  act = jax.nn.silu(out_cols(gate, x_BxLxD, idx_K, how)) * out_cols(up, x_BxLxD, idx_K, how)
  return in_rows(down, act, idx_K, how)


# ----------------------------------------------------------------------------------------------
# Plan (static) and the forward pass.


def parse_layers(spec: str | Sequence[int]) -> tuple[int, ...]:
  """'13-29,31' -> (13, ..., 29, 31); a sequence of ints passes through."""
  if not isinstance(spec, str):
    return tuple(int(i) for i in spec)
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    lo, _, hi = part.partition("-")
    out.extend(range(int(lo), int(hi or lo) + 1))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
  """Per-layer FFN / attention sparsity (0 = dense, no estimator) and mode; hashable, static."""
  ffn: tuple[float, ...]
  attn: tuple[float, ...]
  mode: str = "svd"

  def __post_init__(self):
    object.__setattr__(self, "ffn", tuple(float(s) for s in self.ffn))
    object.__setattr__(self, "attn", tuple(float(s) for s in self.attn))
    if len(self.ffn) != len(self.attn):
      raise ValueError(f"SparsityPlan: {len(self.ffn)} ffn vs {len(self.attn)} attn entries. "
                       "Fix: give one sparsity per layer for both.")
    bad = [s for s in self.ffn + self.attn if not 0.0 <= s < 1.0]
    if bad:
      raise ValueError(f"SparsityPlan: sparsities {bad} are outside [0, 1). "
                       "Fix: use the fraction of channels dropped, e.g. 0.9.")
    if self.mode not in MODES:
      raise ValueError(f"SparsityPlan: mode={self.mode!r} is unknown. Fix: one of {MODES}.")

  @property
  def n_layers(self) -> int:
    return len(self.ffn)

  @classmethod
  def dense(cls, n_layers: int) -> "SparsityPlan":
    return cls((0.0,) * n_layers, (0.0,) * n_layers)

  @classmethod
  def from_layers(cls, n_layers: int, ffn: float = 0.0, ffn_layers="",
                  attn: float = 0.0, attn_layers="", mode: str = "svd") -> "SparsityPlan":
    """One FFN and one attention sparsity on the listed layers ('13-29' or ints), 0 elsewhere."""
    def per_layer(value, spec):
      layers = set(parse_layers(spec))
      if any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"SparsityPlan: layers {sorted(layers)} exceed 0..{n_layers - 1}.")
      return tuple(value if i in layers else 0.0 for i in range(n_layers))
    return cls(per_layer(ffn, ffn_layers), per_layer(attn, attn_layers), mode)

  def estimator_layers(self) -> tuple[int, ...]:
    """Layers whose FFN or attention is sparse (the only ones needing estimators)."""
    return tuple(i for i in range(self.n_layers) if self.ffn[i] > 0 or self.attn[i] > 0)


def bucket_len(n: int, length: int, bucket: int) -> int:
  """n rounded up to a multiple of bucket, capped at length (static shape buckets)."""
  if bucket < 1:
    raise ValueError(f"bucket={bucket} must be >= 1.")
  return min(length, -(-int(n) // bucket) * bucket)


def dense_suffix_len(loss_mask_BxL: np.ndarray, bucket: int = 64) -> int:
  """Host-side static dense length: covers every position with a loss, bucketed."""
  loss_mask = np.asarray(loss_mask_BxL, bool)
  length = loss_mask.shape[1]
  cols = np.flatnonzero(loss_mask.any(axis=0))
  if cols.size == 0:
    return 0
  return bucket_len(length - int(cols[0]), length, bucket)


def channel_overlap(idx_a_K: jax.Array, idx_b_K: jax.Array) -> float:
  """|a & b| / |a| of two kept-channel index sets (estimator vs oracle)."""
  a, b = np.asarray(idx_a_K).ravel(), np.asarray(idx_b_K).ravel()
  return float(np.intersect1d(a, b).size / max(1, np.unique(a).size))


def _split(x_BxLxD: jax.Array, n_sparse: int):
  """(x[:, :n_sparse], x[:, n_sparse:]); as one split, whose transpose is one concatenate
  (two slices would transpose to two full-length pads and their sum)."""
  return tuple(jax.lax.split(x_BxLxD, [n_sparse, x_BxLxD.shape[1] - n_sparse], axis=1))


def _join(sparse, dense):
  parts = [p for p in (sparse, dense) if p is not None and p.shape[1]]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def random_scores(x_BxLxD: jax.Array, n: int, salt: int) -> jax.Array:
  """Uniform scores [n] that change with the batch (keyed by the bits of sum(x)) and salt."""
  bits = jax.lax.bitcast_convert_type(jnp.sum(x_BxLxD.astype(jnp.float32)), jnp.int32)
  return jax.random.uniform(jax.random.fold_in(jax.random.key(salt), bits), (n,))


def _ffn_indices(mlp, x_BxLxD, mask_BxL, est_layer, sparsity, mode):
  f = mlp.gate.out_features
  k = keep_count(f, sparsity)
  x = jax.lax.stop_gradient(x_BxLxD)
  if mode == "random":
    return top_k_indices(random_scores(x, f, 0), k)
  if mode == "svd":
    return top_k_indices(ffn_scores(x, mask_BxL, est_layer["gate"], est_layer["up"]), k)
  act = jax.nn.silu(mlp.gate(x)) * mlp.up(x)
  return top_k_indices(column_norms(act, mask_BxL), k)


def _attn_indices(attn, x_BxLxD, mask_BxL, est_layer, sparsity, mode):
  x = jax.lax.stop_gradient(x_BxLxD)
  if mode == "random":
    c = attn.k.out_features
    norms = [random_scores(x, attn.q.out_features, 1), random_scores(x, c, 2),
             random_scores(x, c, 3)]
  elif mode == "svd":
    norms = [low_rank_column_norms(x, mask_BxL, est_layer[n]["p"], est_layer[n]["q"])
             for n in ("q", "k", "v")]
  else:
    norms = [column_norms(getattr(attn, n)(x), mask_BxL) for n in ("q", "k", "v")]
  return select_attention(*norms, sparsity, attn.n_heads, attn.n_kv_heads)


def sparse_mlp(mlp, x_BxLxD: jax.Array, idx_K: jax.Array | None, n_sparse: int,
               how: str = "gather") -> jax.Array:
  """MLP with tokens [:n_sparse] restricted to idx and the rest dense, [B, L, D]."""
  if idx_K is None or n_sparse == 0:
    return mlp(x_BxLxD)
  xs, xd = _split(x_BxLxD, n_sparse)
  return _join(restricted_mlp(mlp, xs, idx_K, how), mlp(xd) if xd.shape[1] else None)


def _dense_base(lin: Linear, x: jax.Array) -> jax.Array:
  return lin.base(x) if isinstance(lin, LoRALinear) else lin(x)


def restricted_projection(name: str, lin: Linear, x_BxLxN: jax.Array, idx: AttnIndices,
                          n_sparse: int, how: str = "gather") -> jax.Array:
  """q/k/v (kept output columns) or o (kept input rows) restricted on tokens [:n_sparse].

  The base runs restricted on the context and full on the suffix; the LoRA delta runs once
  over all tokens (one adapter matmul chain per projection, not one per token group).
  """
  xs, xd = _split(x_BxLxN, n_sparse)
  if name == "o":
    sparse = _in_rows_base(lin, xs, idx.o, how)
  else:
    sparse = _out_cols_base(lin, xs, getattr(idx, name), how)
  y = _join(sparse, _dense_base(lin, xd) if xd.shape[1] else None)
  return _plus_delta(y, lin, x_BxLxN)


class LayerChannels:
  """One layer's SparseLoRA channel plan for `model.Llama`'s forward (see model.DenseChannels).

  Selects the layer's channels from its normed inputs (estimator or oracle) and restricts the
  base projections on the first n_sparse tokens; the chosen indices are kept in `indices`.
  """

  def __init__(self, *, layer: int, plan: SparsityPlan, estimators: dict | None,
               n_sparse: int, valid_BxL: jax.Array, how: str):
    self.layer, self.plan, self.estimators = layer, plan, estimators
    self.n_sparse, self.valid_BxL, self.how = n_sparse, valid_BxL, how
    self.indices: dict = {"attn": None, "ffn": None}

  def _sparse(self, which: str) -> bool:
    return getattr(self.plan, which)[self.layer] > 0 and self.n_sparse > 0

  def dense_from(self) -> int:
    """Tokens from n_sparse on run dense (all of them in a layer without sparsity)."""
    return self.n_sparse if self._sparse("attn") or self._sparse("ffn") else 0

  def attention_projection(self, attn, h_BxLxD: jax.Array):
    if not self._sparse("attn"):
      return dense_projection
    est = (_layer_est(self.estimators, self.layer, ("q", "k", "v"))
           if self.plan.mode == "svd" else None)
    idx = _attn_indices(attn, h_BxLxD[:, :self.n_sparse], self.valid_BxL[:, :self.n_sparse],
                        est, self.plan.attn[self.layer], self.plan.mode)
    self.indices["attn"] = idx
    return functools.partial(restricted_projection, idx=idx, n_sparse=self.n_sparse,
                             how=self.how)

  def mlp(self, mlp, h_BxLxD: jax.Array) -> jax.Array:
    if not self._sparse("ffn"):
      return mlp(h_BxLxD)
    est = (_layer_est(self.estimators, self.layer, ("gate", "up"))
           if self.plan.mode == "svd" else None)
    idx = _ffn_indices(mlp, h_BxLxD[:, :self.n_sparse], self.valid_BxL[:, :self.n_sparse],
                       est, self.plan.ffn[self.layer], self.plan.mode)
    self.indices["ffn"] = idx
    return sparse_mlp(mlp, h_BxLxD, idx, self.n_sparse, self.how)


def _layer_est(estimators, i: int, modules):
  if estimators is None or layer_key(i) not in estimators:
    raise ValueError(f"SparseLoRA: layer {i} is sparse but has no estimator. Fix: "
                     "build_estimators(model, layers=plan.estimator_layers()) or load them.")
  est = estimators[layer_key(i)]
  missing = [m for m in modules if m not in est]
  if missing:
    raise ValueError(f"SparseLoRA: layer {i} estimator lacks {missing}.")
  return est


class StepLengths(NamedTuple):
  """Static lengths of one fine-tuning step: the dense suffix (its context before it runs
  sparse) and the suffix whose logits are computed (every loss position)."""
  dense_len: int
  logits_len: int


def step_lengths(weights_BxL: np.ndarray, bucket: int, sparse: bool) -> StepLengths:
  """Host-side StepLengths of a batch: suffixes covering every loss position, bucketed.

  sparse=False (dense LoRA, or before SparseLoRA starts) keeps every token dense.
  """
  length = np.shape(weights_BxL)[1]
  logits_len = max(1, dense_suffix_len(weights_BxL, bucket))
  return StepLengths(logits_len if sparse else length, logits_len)


def forward(model, tokens_BxL: jax.Array, estimators: dict | None, plan: SparsityPlan,
            dense_len: int, positions_BxL: jax.Array | None = None,
            segment_ids_BxL: jax.Array | None = None, valid_BxL: jax.Array | None = None,
            return_indices: bool = False, logits_from: int = 0, head: bool = True):
  """SparseLoRA Llama forward: float32 logits [B, L - logits_from, V] (+ indices if asked).

  `model(...)` with one `LayerChannels` per layer. plan and dense_len are static (python);
  tokens [:L - dense_len] are the sparse context. valid marks real tokens for the estimator
  (default: segment_ids > 0, else all). logits_from (static) skips the LM head on earlier
  positions: with L - dense_len, only the dense suffix, which holds every loss position,
  pays for the [D, V] matmul. head=False: hidden states instead of logits (`Llama`).
  If positions >= logits_from are dense in the last layer, its o and MLP run on those rows
  only (`Llama`), so that layer selects no FFN channels (its "ffn" index is None).
  """
  b, length = tokens_BxL.shape
  if plan.n_layers != len(model.layers):
    raise ValueError(f"SparsityPlan has {plan.n_layers} layers, the model "
                     f"{len(model.layers)}. Fix: build the plan with n_layers={len(model.layers)}.")
  if not isinstance(dense_len, int) or not 0 <= dense_len <= length:
    raise ValueError(f"dense_len={dense_len!r} must be a python int in 0..{length} "
                     "(static). Fix: dense_suffix_len(loss_mask, bucket).")
  if return_indices and model.cfg.remat:
    raise ValueError("return_indices needs model.remat=False (indices chosen inside a "
                     "rematerialised block cannot leave it). Fix: set model.remat=False.")
  if valid_BxL is None:
    valid_BxL = (segment_ids_BxL > 0 if segment_ids_BxL is not None
                 else jnp.ones((b, length), bool))
  how = "mask" if plan.mode == "oracle" else "gather"
  channels = [LayerChannels(layer=i, plan=plan, estimators=estimators,
                            n_sparse=length - dense_len, valid_BxL=valid_BxL, how=how)
              for i in range(plan.n_layers)]
  # A step with no sparse layer runs the plain dense forward (any model.perf.layer_loop).
  dense = dense_len == length or not any(plan.ffn + plan.attn)
  logits = model(tokens_BxL, positions_BxL, segment_ids_BxL, logits_from=logits_from,
                 channels=None if dense else channels, head=head)
  return (logits, [ch.indices for ch in channels]) if return_indices else logits


class Estimator(nnx.Variable):
  """Frozen SVD estimator factor: saved with the model, never trained."""


class SparseLoRALlama(nnx.Module):
  """Llama (with LoRA applied) + its estimators + a static plan; __call__ = `forward`."""

  def __init__(self, model, estimators: dict | None, plan: SparsityPlan):
    self.model = model
    self.plan = plan
    est = {} if estimators is None else estimators
    self.estimators = nnx.data(jax.tree.map(Estimator, est))

  @property
  def cfg(self):
    """The wrapped Llama's model config (its resolved `perf` settings)."""
    return self.model.cfg

  @property
  def lm_head(self):
    """The wrapped Llama's LM head (for a loss that applies it itself)."""
    return self.model.lm_head

  def __call__(self, tokens_BxL: jax.Array, lengths: int | StepLengths, positions_BxL=None,
               segment_ids_BxL=None, valid_BxL=None, head: bool = True) -> jax.Array:
    """Logits [B, logits_len, V] of the last logits_len positions (all for an int dense_len);
    head=False: the hidden states [B, logits_len, D] instead."""
    if not isinstance(lengths, StepLengths):
      lengths = StepLengths(lengths, tokens_BxL.shape[1])
    est = jax.tree.map(lambda v: v[...], self.estimators,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
    return forward(self.model, tokens_BxL, est, self.plan, lengths.dense_len, positions_BxL,
                   segment_ids_BxL, valid_BxL,
                   logits_from=tokens_BxL.shape[1] - lengths.logits_len, head=head)


def plan_from_config(sparse_cfg, n_layers: int) -> SparsityPlan:
  """SparsityPlan from a fine-tuning config's `sparse` group ('<fraction>@<layers>;...')."""
  if not sparse_cfg.enabled:
    return SparsityPlan.dense(n_layers)
  return SparsityPlan(parse_layer_sparsity(sparse_cfg.ffn, n_layers, "sparse.ffn"),
                      parse_layer_sparsity(sparse_cfg.attn, n_layers, "sparse.attn"),
                      sparse_cfg.get("mode", "svd"))