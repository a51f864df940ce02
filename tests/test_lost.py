"""lost_split against an independent float64 NumPy re-derivation of the LOST initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lost_jax
from lost_jax import LostFactors, lost_split


def random_kernel(n: int, m: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
  """A float32 Gaussian kernel [n, m]."""
  return (scale * np.random.default_rng(seed).standard_normal((n, m))).astype(np.float32)


def reference_split(k0_NxM, rank, sparsity, complement_rank=None):
  """The LOST initialisation re-derived in float64 NumPy: returns a dict of references."""
  k0 = np.asarray(k0_NxM, np.float64)
  n, _ = k0.shape
  u, s, vt = np.linalg.svd(k0, full_matrices=False)
  c = len(s) - rank if complement_rank is None else complement_rank
  trunc_NxM = (u[:, :rank] * s[:rank]) @ vt[:rank]
  comp_NxM = (u[:, rank:rank + c] * s[rank:rank + c]) @ vt[rank:rank + c]
  score_N = np.linalg.norm(comp_NxM, axis=1)
  k = max(1, math.ceil(sparsity * n))
  desc = np.sort(score_N)[::-1]
  gap = desc[k - 1] - desc[k] if k < n else np.inf
  return dict(k0=k0, s=s, trunc=trunc_NxM, comp=comp_NxM, score=score_N, k=k, gap=gap,
              top_k=np.sort(np.argsort(-score_N)[:k]))


def top_k(ref) -> np.ndarray:
  """The reference channel set, once the test's kernel is known to have no near-tie at k."""
  # Precondition of the test, not of the code: float32 scores must order the boundary alike.
  assert ref["gap"] > 1e-4 * ref["score"].max(), "near-tie at the top-k boundary; change seed"
  return ref["top_k"]


def atol_for(ref) -> float:
  """Absolute tolerance for float32 SVD results: a few ulps of the spectral norm."""
  return 3e-5 * ref["s"][0]


SHAPES = [(48, 32), (32, 48), (40, 40)]


def test_lost_factors_is_a_named_tuple():
  assert LostFactors._fields == ("a", "b", "indices", "values")
  assert lost_jax.lost_split is lost_split


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.slow
def test_low_rank_product_is_svd_truncation(n, m, rank):
  k0 = random_kernel(n, m, seed=1)
  ref = reference_split(k0, rank, 0.25)
  out = lost_split(jnp.asarray(k0), rank, 0.25)
  a, b = np.asarray(out.a, np.float64), np.asarray(out.b, np.float64)
  assert a.shape == (n, rank) and b.shape == (m, rank)
  np.testing.assert_allclose(a @ b.T, ref["trunc"], rtol=0, atol=atol_for(ref))


@pytest.mark.parametrize("n,m", SHAPES)
def test_factors_split_singular_values_evenly(n, m):
  """A = U sqrt(s), B = V sqrt(s): A^T A = B^T B = diag(s_r), and A A^T = U diag(s_r) U^T."""
  rank = 6
  k0 = random_kernel(n, m, seed=2)
  ref = reference_split(k0, rank, 0.25)
  out = lost_split(k0, rank, 0.25)
  a, b = np.asarray(out.a, np.float64), np.asarray(out.b, np.float64)
  s_r = ref["s"][:rank]
  np.testing.assert_allclose(a.T @ a, np.diag(s_r), rtol=0, atol=atol_for(ref))
  np.testing.assert_allclose(b.T @ b, np.diag(s_r), rtol=0, atol=atol_for(ref))
  u, _, vt = np.linalg.svd(ref["k0"], full_matrices=False)
  np.testing.assert_allclose(a @ a.T, (u[:, :rank] * s_r) @ u[:, :rank].T, rtol=0,
                             atol=atol_for(ref))
  np.testing.assert_allclose(b @ b.T, (vt[:rank].T * s_r) @ vt[:rank], rtol=0,
                             atol=atol_for(ref))


@pytest.mark.parametrize("n,m", SHAPES)
def test_truncation_plus_full_complement_reconstructs_kernel(n, m):
  """With every channel kept, the complement values are K0 - A B^T exactly."""
  k0 = random_kernel(n, m, seed=3)
  ref = reference_split(k0, 5, 1.0)
  out = lost_split(k0, 5, 1.0, sparse_init="complement")
  np.testing.assert_array_equal(np.asarray(out.indices), np.arange(n))
  a, b = np.asarray(out.a, np.float64), np.asarray(out.b, np.float64)
  recon = a @ b.T + np.asarray(out.values, np.float64)
  np.testing.assert_allclose(recon, ref["k0"], rtol=0, atol=atol_for(ref))
  np.testing.assert_allclose(np.asarray(out.values), ref["comp"], rtol=0, atol=atol_for(ref))


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("sparsity", [0.05, 0.25, 0.5])
def test_indices_are_top_k_channels_by_complement_row_norm(n, m, sparsity):
  k0 = random_kernel(n, m, seed=4)
  ref = reference_split(k0, 4, sparsity)
  out = lost_split(k0, 4, sparsity)
  assert out.indices.shape == (ref["k"],)
  np.testing.assert_array_equal(np.asarray(out.indices), top_k(ref))


def test_indices_follow_complement_not_weight_row_norms():
  """Channels with huge low-rank energy but no complement energy must not be selected."""
  n, m, rank = 32, 24, 2
  rng = np.random.default_rng(5)
  # Rows 0..7 carry a strong rank-2 pattern and nothing else, so all their energy is in the
  # top-2 triplets; rows 8.. carry weak noise, which is where the complement lives.
  k0 = np.zeros((n, m))
  k0[:8] = 50.0 * rng.standard_normal((8, 2)) @ rng.standard_normal((2, m))
  k0[8:] = rng.standard_normal((n - 8, m))
  k0 = k0.astype(np.float32)
  ref = reference_split(k0, rank, 0.25)
  assert np.argsort(-np.linalg.norm(k0, axis=1))[:8].max() < 8  # weight norms prefer rows 0..7
  out = lost_split(k0, rank, 0.25)
  np.testing.assert_array_equal(np.asarray(out.indices), top_k(ref))
  assert np.asarray(out.indices).min() >= 8


@pytest.mark.parametrize("n,m", SHAPES)
def test_values_complement_and_weight(n, m):
  k0 = random_kernel(n, m, seed=16)
  ref = reference_split(k0, 4, 0.25)
  idx = top_k(ref)
  comp = lost_split(k0, 4, 0.25, sparse_init="complement")
  np.testing.assert_array_equal(np.asarray(comp.indices), idx)
  assert comp.values.shape == (ref["k"], m)
  np.testing.assert_allclose(np.asarray(comp.values), ref["comp"][idx], rtol=0,
                             atol=atol_for(ref))
  weight = lost_split(k0, 4, 0.25, sparse_init="weight")
  np.testing.assert_array_equal(np.asarray(weight.indices), idx)
  # K0 rows are copied, not recomputed: exact up to float32 storage.
  np.testing.assert_allclose(np.asarray(weight.values), k0[idx], rtol=1e-6, atol=0)
  # The low-rank factors do not depend on the sparse initialisation.
  np.testing.assert_allclose(np.asarray(weight.a) @ np.asarray(weight.b).T,
                             np.asarray(comp.a) @ np.asarray(comp.b).T, rtol=0,
                             atol=atol_for(ref))


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("complement_rank", [1, 6])
def test_partial_complement_rank(n, m, complement_rank):
  rank = 4
  k0 = random_kernel(n, m, seed=7)
  ref = reference_split(k0, rank, 0.25, complement_rank=complement_rank)
  full = reference_split(k0, rank, 1.0)
  # The partial complement must differ from the full one, else this test checks nothing.
  assert np.abs(ref["comp"] - full["comp"]).max() > 0.1 * np.abs(full["comp"]).max()
  out = lost_split(k0, rank, 0.25, complement_rank=complement_rank)
  np.testing.assert_array_equal(np.asarray(out.indices), top_k(ref))
  np.testing.assert_allclose(np.asarray(out.values), ref["comp"][top_k(ref)], rtol=0,
                             atol=atol_for(ref))
  np.testing.assert_allclose(np.asarray(out.a) @ np.asarray(out.b).T, ref["trunc"], rtol=0,
                             atol=atol_for(ref))


def test_complement_rank_covering_everything_equals_default():
  n, m, rank = 40, 24, 4
  k0 = random_kernel(n, m, seed=8)
  default = lost_split(k0, rank, 0.25)
  explicit = lost_split(k0, rank, 0.25, complement_rank=m - rank)
  np.testing.assert_array_equal(np.asarray(default.indices), np.asarray(explicit.indices))
  np.testing.assert_allclose(np.asarray(default.values), np.asarray(explicit.values),
                             rtol=0, atol=1e-4)


@pytest.mark.parametrize("n,sparsity,k", [
    (48, 1.0, 48),      # keep everything
    (48, 1e-6, 1),      # at least one channel
    (48, 0.01, 1),      # ceil(0.48) = 1
    (48, 0.25, 12),     # exact product, no rounding up
    (48, 0.1, 5),       # ceil(4.8) = 5
    (40, 0.5, 20),
])
def test_number_of_kept_channels(n, sparsity, k):
  out = lost_split(random_kernel(n, 24, seed=9), 3, sparsity)
  assert out.indices.shape == (k,)
  assert out.values.shape == (k, 24)


def test_rank_equal_to_min_dim_is_allowed():
  n, m = 32, 20
  k0 = random_kernel(n, m, seed=10)
  ref = reference_split(k0, m, 1.0)
  out = lost_split(k0, m, 0.25)
  np.testing.assert_allclose(np.asarray(out.a) @ np.asarray(out.b).T, k0, rtol=0,
                             atol=atol_for(ref))
  idx = np.asarray(out.indices)
  assert idx.shape == (8,) and np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n


@pytest.mark.parametrize("sparse_init", ["complement", "weight", "random_channels"])
@pytest.mark.parametrize("as_type", [np.float32, np.float64, jnp.bfloat16])
def test_output_dtypes(sparse_init, as_type):
  k0 = random_kernel(24, 16, seed=11).astype(as_type)
  out = lost_split(k0, 4, 0.25, sparse_init=sparse_init, key=jax.random.key(0))
  assert out.a.dtype == jnp.float32
  assert out.b.dtype == jnp.float32
  assert out.values.dtype == jnp.float32
  assert out.indices.dtype == jnp.int32


def test_small_scale_kernel():
  """Realistic init scale (std 0.02): tolerances are relative, selection is scale-free."""
  k0 = random_kernel(64, 40, seed=12, scale=0.02)
  ref = reference_split(k0, 8, 0.1)
  out = lost_split(k0, 8, 0.1)
  np.testing.assert_array_equal(np.asarray(out.indices), top_k(ref))
  np.testing.assert_allclose(np.asarray(out.a) @ np.asarray(out.b).T, ref["trunc"], rtol=0,
                             atol=atol_for(ref))
  np.testing.assert_allclose(np.asarray(out.values), ref["comp"][top_k(ref)], rtol=0,
                             atol=atol_for(ref))


def test_random_channels():
  n, m, rank = 64, 24, 4
  k0 = random_kernel(n, m, seed=13)
  ref = reference_split(k0, rank, 0.25)
  out = lost_split(k0, rank, 0.25, sparse_init="random_channels", key=jax.random.key(1))
  idx = np.asarray(out.indices)
  assert idx.shape == (16,) and idx.dtype == np.int32
  assert np.all(np.diff(idx) > 0), "sorted and distinct"
  assert idx.min() >= 0 and idx.max() < n
  np.testing.assert_allclose(np.asarray(out.values), k0[idx], rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(out.a) @ np.asarray(out.b).T, ref["trunc"], rtol=0,
                             atol=atol_for(ref))
  again = lost_split(k0, rank, 0.25, sparse_init="random_channels", key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(again.indices), idx)
  np.testing.assert_array_equal(np.asarray(again.values), np.asarray(out.values))
  # P(two keys draw the same 16 of 64) = 1 / C(64, 16), about 2e-15.
  other = lost_split(k0, rank, 0.25, sparse_init="random_channels", key=jax.random.key(2))
  assert not np.array_equal(np.asarray(other.indices), idx)


def test_random_channels_are_not_the_scored_channels():
  """Over several keys the random draw must not always coincide with the top-k selection."""
  k0 = random_kernel(64, 24, seed=14)
  ref = reference_split(k0, 4, 0.25)
  draws = [np.asarray(lost_split(k0, 4, 0.25, sparse_init="random_channels",
                                 key=jax.random.key(s)).indices) for s in range(3)]
  assert not all(np.array_equal(d, top_k(ref)) for d in draws)
  # Every channel is reachable: across keys the union covers more than one top-k set.
  assert len(np.unique(np.concatenate(draws))) > 16


def test_random_channels_requires_key():
  with pytest.raises((ValueError, TypeError)):
    lost_split(random_kernel(24, 16), 4, 0.25, sparse_init="random_channels")


@pytest.mark.parametrize("rank", [0, -1, 17, 100])
def test_invalid_rank_raises(rank):
  with pytest.raises(ValueError):
    lost_split(random_kernel(24, 16), rank, 0.25)


@pytest.mark.parametrize("sparsity", [0.0, -0.1, 1.01, 2.0])
def test_invalid_sparsity_raises(sparsity):
  with pytest.raises(ValueError):
    lost_split(random_kernel(24, 16), 4, sparsity)


def test_invalid_rank_rectangular_uses_min_dim():
  """rank may not exceed min(n, m) regardless of which side is smaller."""
  with pytest.raises(ValueError):
    lost_split(random_kernel(16, 24), 17, 0.25)
  lost_split(random_kernel(16, 24), 16, 0.25)  # allowed
