"""SparseLoRA's offline SVD estimators of the frozen base kernels: build, save, load, check."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lost_jax import files, progress
from lost_jax.layers.linear import check_rank
from lost_jax.adapters.lora import Linear
from lost_jax.models.llama import projection

EST_MODULES = ("gate", "up", "q", "k", "v")


def svd_estimator(kernel_NxM: jax.Array, rank: int = 8) -> tuple[jax.Array, jax.Array]:
  """Float32 factors (P [n, r] = U_r sqrt(s_r), Q [r, m] = sqrt(s_r) V_r^T), K ~= P @ Q."""
  n, m = kernel_NxM.shape
  check_rank(n, m, rank, "estimator", "sparse.estimator_rank (the paper uses 8)")
  u, s, vt = jnp.linalg.svd(kernel_NxM.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def layer_key(i: int) -> str:
  return f"layer_{i}"


def _base_kernel(lin) -> jax.Array:
  if not isinstance(lin, Linear):
    raise ValueError(f"SparseLoRA needs dense base projections, found {type(lin).__name__}. "
                     "Fix: fine-tune a model with model.linear.kind='dense'.")
  return lin.kernel[...]


def build_estimators(model, rank: int = 8, layers: Sequence[int] | None = None) -> dict:
  """{'layer_i': {m: {'p': [n, r], 'q': [r, m']}} for m in gate, up, q, k, v} (float32)."""
  layers = range(len(model.layers)) if layers is None else layers
  est = {}
  for i in progress.track(list(layers), "SparseLoRA estimators (SVD)", "layer"):
    block = model.layers[i]
    est[layer_key(i)] = {}
    for name in EST_MODULES:
      p, q = svd_estimator(_base_kernel(projection(block, name)), rank)
      est[layer_key(i)][name] = {"p": p, "q": q}
  return est


def estimator_mismatch(kernel_NxM: jax.Array, p_NxR: jax.Array, q_RxM: jax.Array) -> float:
  """Relative error of P^T K Q^T against diag(s)^2: ~1e-6 iff (P, Q) is this kernel's SVD."""
  k = kernel_NxM.astype(jnp.float32)
  s = jnp.sum(p_NxR * p_NxR, axis=0)                    # P^T P = diag(s)
  got = p_NxR.T @ k @ q_RxM.T                            # = diag(s)^2 for the true factors
  return float(jnp.linalg.norm(got - jnp.diag(s * s)) / jnp.linalg.norm(s * s))


class DamagedFile(ValueError):
  """An estimator file that cannot be read (torn, truncated, not an estimator file)."""


def save_estimators(path: str, est: dict) -> None:
  """Store estimator factors as one .npz (keys 'layer_i/module/p|q' plus a JSON header)."""
  arrays = {}
  for lk, mods in est.items():
    for name, f in mods.items():
      for which in ("p", "q"):
        arrays[f"{lk}/{name}/{which}"] = np.asarray(f[which], np.float32)
  ranks = {a.shape[1] for k, a in arrays.items() if k.endswith("/p")}
  header = {"format": "sparselora_estimators/1", "rank": sorted(ranks)}
  buffer = io.BytesIO()
  np.savez(buffer, __header__=np.asarray(json.dumps(header)), **arrays)
  files.atomic_write(path, buffer.getvalue())   # a kill mid-write leaves no torn file


def load_estimators(path: str, model=None, rank: int | None = None,
                    verify: bool = True, tol: float = 1e-3) -> dict:
  """Reload `save_estimators` output; with `model`, check shapes (and factors if verify)."""
  try:
    with np.load(path) as data:
      header = json.loads(str(data["__header__"]))
      est: dict = {}
      for key in data.files:
        if key == "__header__":
          continue
        lk, name, which = key.split("/")
        est.setdefault(lk, {}).setdefault(name, {})[which] = jnp.asarray(data[key])
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
    # The reason's first sentence: numpy's pickle refusal goes on with advice to unpickle.
    raise DamagedFile(f"{path}: unreadable ({type(e).__name__}: "
                      f"{str(e).split('. ')[0].rstrip('.')})") from e
  if header.get("format") != "sparselora_estimators/1":
    raise DamagedFile(f"{path}: not a SparseLoRA estimator file (header {header}).")
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
        kernel = _base_kernel(projection(model.layers[i], name))
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
