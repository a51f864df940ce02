"""SparseLoRA's offline low-rank estimators of the frozen base kernels: build, save, load, check.

Two kinds (`sparse.estimator`), both rank-r factors (P [n, r], Q [r, m]) with x K ~= x P Q, so the
channel scores, their FLOPs and the static shapes are the same:
- `svd`: the paper's truncated SVD of K (the best rank-r K in the plain Frobenius norm);
- `asvd`: activation-aware, the best rank-r K in the norm the channel scores feel,
  E_x ||x (K - P Q)||, x the layer's normed inputs on the calibration batches
  (`input_moments`, `asvd_estimator`).
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lost_jax import files, progress
from lost_jax.layers.linear import check_rank
from lost_jax.adapters.lora import Linear
from lost_jax.models.llama import dense_projection, projection

EST_MODULES = ("gate", "up", "q", "k", "v")
ESTIMATORS = ("svd", "asvd")
# The input each estimated projection reads: the attention's or the MLP's normed input.
INPUT_OF = {"q": "attn", "k": "attn", "v": "attn", "gate": "mlp", "up": "mlp"}
# asvd's C + ASVD_RIDGE * (tr C / n) I: positive definite, so C^{-1/2} exists, and directions
# the calibration tokens barely visit are not blown up by it.
ASVD_RIDGE = 1e-3
FORMAT = "sparselora_estimators/1"


def svd_estimator(kernel_NxM: jax.Array, rank: int = 8) -> tuple[jax.Array, jax.Array]:
  """Float32 factors (P [n, r] = U_r sqrt(s_r), Q [r, m] = sqrt(s_r) V_r^T), K ~= P @ Q."""
  n, m = kernel_NxM.shape
  check_rank(n, m, rank, "estimator", "sparse.estimator_rank (the paper uses 8)")
  u, s, vt = jnp.linalg.svd(kernel_NxM.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def asvd_estimator(kernel_NxM: jax.Array, moment_NxN: jax.Array, rank: int = 8,
                   ridge: float = ASVD_RIDGE) -> tuple[jax.Array, jax.Array]:
  """Float32 activation-aware factors (P [n, r], Q [r, m]) of K for inputs of second moment C.

  They minimise E_x ||x K - x P Q||^2 = ||C^{1/2} (K - P Q)||_F^2 over rank-r products, with
  C = E[x^T x] (uncentred: the estimator predicts x K itself, not its deviation from a mean).
  With C_e = C + ridge * (tr C / n) I = E diag(l) E^T, C_e^{1/2} = E diag(sqrt l) E^T, and the
  SVD C_e^{1/2} K = U diag(s) V^T, the minimiser under C_e is C_e^{-1/2} U_r diag(s_r) V_r^T
  (Eckart-Young for C_e^{1/2} K, mapped back by the invertible C_e^{-1/2}), split evenly:
    P = C_e^{-1/2} U_r sqrt(s_r),   Q = sqrt(s_r) V_r^T.
  C = I gives P Q = the truncated SVD of K (svd_estimator's product).
  """
  n, m = kernel_NxM.shape
  check_rank(n, m, rank, "estimator", "sparse.estimator_rank (the paper uses 8)")
  if moment_NxN.shape != (n, n) or not ridge > 0:
    raise ValueError(f"asvd_estimator: moment {moment_NxN.shape} must be {n}x{n} and ridge "
                     f"{ridge} > 0. Fix: the second moment of this kernel's inputs.")
  c = moment_NxN.astype(jnp.float32)
  c = 0.5 * (c + c.T)
  lam, vec = jnp.linalg.eigh(c)
  lam = jnp.maximum(lam, 0.0)
  lam = lam + ridge * jnp.maximum(jnp.mean(lam), jnp.finfo(jnp.float32).tiny)
  root = (vec * jnp.sqrt(lam)[None, :]) @ vec.T
  inv_root = (vec * jax.lax.rsqrt(lam)[None, :]) @ vec.T
  u, s, vt = jnp.linalg.svd(root @ kernel_NxM.astype(jnp.float32), full_matrices=False)
  half = jnp.sqrt(s[:rank])
  return inv_root @ (u[:, :rank] * half[None, :]), half[:, None] * vt[:rank]


def token_mask(segment_ids_BxL: jax.Array, n_sparse: int, tokens: str) -> jax.Array:
  """bool [B, L]: the tokens the channel scores see, the valid context (positions < n_sparse)
  or every valid token (sparse.estimator_tokens, as `LayerChannels` reads them)."""
  valid = jnp.asarray(segment_ids_BxL) > 0
  if tokens == "all":
    return valid
  return valid & (jnp.arange(valid.shape[1]) < n_sparse)[None, :]


def moment_sum(x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """sum over the masked-in tokens of x^T x, float32 [D, D]."""
  x = x_BxLxD.astype(jnp.float32)
  return jnp.einsum("bld,ble,bl->de", x, x, mask_BxL.astype(jnp.float32))


class _MomentChannels:
  """A dense layer's channel plan (`llama.DenseChannels`) that also sums x^T x of its normed
  attention and MLP inputs over the masked-in tokens."""

  def __init__(self, mask_BxL: jax.Array):
    self.mask_BxL = mask_BxL
    self.sums: dict = {}

  def attention_projection(self, attn, h_BxLxD: jax.Array):
    del attn
    self.sums["attn"] = moment_sum(h_BxLxD, self.mask_BxL)
    return dense_projection

  def mlp(self, mlp, h_BxLxD: jax.Array) -> jax.Array:
    self.sums["mlp"] = moment_sum(h_BxLxD, self.mask_BxL)
    return mlp(h_BxLxD)

  def dense_from(self) -> int:
    return 0


def input_moments(model, batches: Sequence[dict], masks: Sequence[jax.Array],
                  layers: Sequence[int]) -> dict:
  """{'layer_i': {'attn': C [D, D], 'mlp': C [D, D]}}: E[x^T x] of the normed attention and MLP
  inputs of the dense forward, over the tokens `masks` (bool [B, L], one per batch) mark.

  One jitted forward per batch, through the blocks up to the last layer asked for (its own
  loop over `model.layers`, without remat: nothing is differentiated).
  """
  layers = sorted(set(layers))
  graphdef, state = nnx.split(model)

  @jax.jit
  def sums(state, tokens_BxL, positions_BxL, segment_ids_BxL, mask_BxL):
    m = nnx.merge(graphdef, state)
    x = m.embed(tokens_BxL, m.dtype)
    out = {}
    for i in range(layers[-1] + 1):
      ch = _MomentChannels(mask_BxL)
      x = m.layers[i](x, positions_BxL, segment_ids_BxL, channels=ch, local=m.local[i])
      if i in layers:
        out[layer_key(i)] = ch.sums
    return out, jnp.sum(mask_BxL.astype(jnp.float32))

  total, count = None, 0.0
  for batch, mask in progress.track(list(zip(batches, masks)), "estimator input moments",
                                    "batch"):
    got, n = sums(state, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                  jnp.asarray(batch["segment_ids"]), jnp.asarray(mask, bool))
    total = got if total is None else jax.tree.map(jnp.add, total, got)
    count += float(n)
  if not count:
    raise ValueError("input_moments: the masks select no token. Fix: calibration batches "
                     "with context tokens (or sparse.estimator_tokens='all').")
  return jax.tree.map(lambda s: s / count, total)


def layer_key(i: int) -> str:
  return f"layer_{i}"


def _base_kernel(lin) -> jax.Array:
  if not isinstance(lin, Linear):
    raise ValueError(f"SparseLoRA needs dense base projections, found {type(lin).__name__}. "
                     "Fix: fine-tune a model with model.linear.kind='dense'.")
  return lin.kernel[...]


def build_estimators(model, rank: int = 8, layers: Sequence[int] | None = None, *,
                     kind: str = "svd", moments: dict | None = None) -> dict:
  """{'layer_i': {m: {'p': [n, r], 'q': [r, m']}} for m in gate, up, q, k, v} (float32);
  kind 'asvd' needs the layers' `input_moments`."""
  layers = range(len(model.layers)) if layers is None else layers
  if kind not in ESTIMATORS:
    raise ValueError(f"estimator {kind!r} is unknown. Fix: one of {ESTIMATORS}.")
  if kind == "asvd" and (moments is None or any(layer_key(i) not in moments for i in layers)):
    raise ValueError("asvd estimators need the input moments of every layer they are built "
                     "for. Fix: input_moments(model, batches, masks, layers).")
  est = {}
  for i in progress.track(list(layers), f"SparseLoRA estimators ({kind.upper()})", "layer"):
    block = model.layers[i]
    est[layer_key(i)] = {}
    for name in EST_MODULES:
      kernel = _base_kernel(projection(block, name))
      p, q = (svd_estimator(kernel, rank) if kind == "svd" else
              asvd_estimator(kernel, moments[layer_key(i)][INPUT_OF[name]], rank))
      est[layer_key(i)][name] = {"p": p, "q": q}
  return est


def kernel_sketch(kernel_NxM: jax.Array) -> jax.Array:
  """g^T K [m] for a fixed standard normal g [n]: a fingerprint of the kernel an estimator was
  built from, checkable when its factors alone are not (asvd's depend on the inputs too)."""
  g = np.random.default_rng(0).standard_normal(kernel_NxM.shape[0]).astype(np.float32)
  return jnp.asarray(g) @ kernel_NxM.astype(jnp.float32)


def estimator_mismatch(kernel_NxM: jax.Array, p_NxR: jax.Array, q_RxM: jax.Array) -> float:
  """Relative error of P^T K Q^T against diag(s)^2: ~1e-6 iff (P, Q) is this kernel's SVD."""
  k = kernel_NxM.astype(jnp.float32)
  s = jnp.sum(p_NxR * p_NxR, axis=0)                    # P^T P = diag(s)
  got = p_NxR.T @ k @ q_RxM.T                            # = diag(s)^2 for the true factors
  return float(jnp.linalg.norm(got - jnp.diag(s * s)) / jnp.linalg.norm(s * s))


class DamagedFile(ValueError):
  """An estimator file that cannot be read (torn, truncated, not an estimator file)."""


def save_estimators(path: str, est: dict, *, kind: str = "svd",
                    calibration: dict | None = None, model=None) -> None:
  """Store estimator factors as one .npz (keys 'layer_i/module/p|q' plus a JSON header naming
  the kind, rank and, for asvd, the calibration data and ridge); with `model`, also the
  sketches of the kernels they were built from ('__sketch__/layer_i/module')."""
  arrays = {}
  for lk, mods in est.items():
    for name, f in mods.items():
      for which in ("p", "q"):
        arrays[f"{lk}/{name}/{which}"] = np.asarray(f[which], np.float32)
      if model is not None:
        kernel = _base_kernel(projection(model.layers[int(lk.split("_")[1])], name))
        arrays[f"__sketch__/{lk}/{name}"] = np.asarray(kernel_sketch(kernel))
  ranks = {a.shape[1] for k, a in arrays.items() if k.endswith("/p")}
  header = {"format": FORMAT, "rank": sorted(ranks), "estimator": kind}
  if kind == "asvd":
    header.update(calibration=calibration, ridge=ASVD_RIDGE)
  buffer = io.BytesIO()
  np.savez(buffer, __header__=np.asarray(json.dumps(header)), **arrays)
  files.atomic_write(path, buffer.getvalue())   # a kill mid-write leaves no torn file


def load_estimators(path: str, model=None, rank: int | None = None,
                    verify: bool = True, tol: float = 1e-3, *, kind: str | None = None,
                    calibration: dict | None = None) -> dict:
  """Reload `save_estimators` output; with `kind` (and for asvd `calibration`), refuse a file
  of another kind or calibration data; with `model`, check shapes and, if verify, the factors
  (svd: the SVD identity) and the kernel sketches (where stored) against its kernels."""
  try:
    with np.load(path) as data:
      header = json.loads(str(data["__header__"]))
      est: dict = {}
      sketches: dict = {}
      for key in data.files:
        if key == "__header__":
          continue
        if key.startswith("__sketch__/"):
          sketches[key.removeprefix("__sketch__/")] = jnp.asarray(data[key])
          continue
        lk, name, which = key.split("/")
        est.setdefault(lk, {}).setdefault(name, {})[which] = jnp.asarray(data[key])
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
    # The reason's first sentence: numpy's pickle refusal goes on with advice to unpickle.
    raise DamagedFile(f"{path}: unreadable ({type(e).__name__}: "
                      f"{str(e).split('. ')[0].rstrip('.')})") from e
  if header.get("format") != FORMAT:
    raise DamagedFile(f"{path}: not a SparseLoRA estimator file (header {header}).")
  built = header.get("estimator", "svd")   # files from before the setting are svd
  if rank is not None and header["rank"] != [rank]:
    raise ValueError(f"{path}: estimator rank {header['rank']} != requested {rank}. "
                     "Fix: rebuild with build_estimators(model, rank).")
  if kind is not None and built != kind:
    raise ValueError(f"{path}: {built} estimators, requested {kind}. Fix: rebuild with "
                     f"build_estimators(model, rank, kind={kind!r}).")
  if built == "asvd" and kind == "asvd" and (
      header.get("calibration") != json.loads(json.dumps(calibration))
      or header.get("ridge") != ASVD_RIDGE):
    raise ValueError(f"{path}: asvd estimators fitted to other calibration data (or ridge "
                     f"{header.get('ridge')}, now {ASVD_RIDGE}). Fix: rebuild them on this "
                     "run's calibration batches.")
  if model is not None:
    for lk, mods in est.items():
      i = int(lk.split("_")[1])
      if i >= len(model.layers):
        raise ValueError(f"{path}: has {lk} but the model has {len(model.layers)} layers. "
                         "Fix: rebuild the estimators for this model.")
      for name, f in mods.items():
        kernel = _base_kernel(projection(model.layers[i], name))
        n, m = kernel.shape
        if f["p"].shape[0] != n or f["q"].shape[1] != m:
          raise ValueError(f"{path}: {lk}/{name} factors {f['p'].shape} x {f['q'].shape} do "
                           f"not fit the {n}x{m} kernel. Fix: rebuild the estimators.")
        if not verify:
          continue
        sketch = sketches.get(f"{lk}/{name}")
        err = (estimator_mismatch(kernel, f["p"], f["q"]) if built == "svd" else 0.0)
        if sketch is not None:
          want = kernel_sketch(kernel)
          err = max(err, float(jnp.linalg.norm(sketch - want) / jnp.linalg.norm(want)))
        if err > tol:
          raise ValueError(f"{path}: {lk}/{name} factors are not the estimator of this "
                           f"model's kernel (mismatch {err:.2e} > {tol}). Fix: rebuild the "
                           "estimators from the base checkpoint being fine-tuned.")
  return est
