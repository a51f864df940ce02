"""SparseLoRA: estimator, channel scores and restricted compute vs NumPy re-derivations."""

import functools
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import lora_model, np_silu, rand
from lost_jax import configs
from lost_jax.adapters.lora import LoRALinear, LoRAParam
from lost_jax.adapters.sparselora import estimator as sl_estimator
from lost_jax.adapters.sparselora import model as sl
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora import restrict as sl_restrict
from lost_jax.adapters.sparselora import select as sl_select
from lost_jax.models.llama import projection as llama_projection
from lost_jax.recipes import finetune

B, L, D, F, H = 2, 10, 64, 96, 4
HD = D // H
TOL = dict(rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- NumPy references


def np_linear(lin, x, colmask=None, rowmask=None):
  """Base with masked kernel (columns for outputs, rows for inputs) + unmasked LoRA."""
  k = np.asarray(lin.kernel[...], np.float64)
  if colmask is not None:
    k = k * colmask[None, :]
  if rowmask is not None:
    k = k * rowmask[:, None]
  y = x @ k
  if isinstance(lin, LoRALinear):
    y = y + lin.scale * (x @ np.asarray(lin.lora_a[...])) @ np.asarray(lin.lora_b[...])
  return y


def np_mask(idx, n):
  m = np.zeros(n)
  m[np.asarray(idx)] = 1.0
  return m


def np_mlp(mlp, x, mask=None):
  act = np_silu(np_linear(mlp.gate, x, colmask=mask)) * np_linear(mlp.up, x, colmask=mask)
  return np_linear(mlp.down, act, rowmask=mask)


def np_rope(x, pos, theta):
  hd = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = pos[..., None] * inv
  ang = np.concatenate([ang, ang], -1)[:, :, None, :]
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return x * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def np_attention(attn, x, n_sparse, idx=None, pos=None, seg=None):
  """Tokens [:n_sparse] use the masked q/k/v/o kernels; causal GQA attention, dense."""
  b, length, _ = x.shape
  h, g = attn.n_heads, attn.n_kv_heads
  pos = np.broadcast_to(np.arange(length), (b, length)) if pos is None else pos

  def proj(lin, name):
    dense = np_linear(lin, x)
    if idx is None:
      return dense
    m = np_mask(getattr(idx, name), lin.out_features)
    return np.concatenate([np_linear(lin, x[:, :n_sparse], colmask=m), dense[:, n_sparse:]], 1)

  q = np_rope(proj(attn.q, "q").reshape(b, length, h, HD), pos, attn.rope_theta)
  k = np_rope(proj(attn.k, "k").reshape(b, length, g, HD), pos, attn.rope_theta)
  v = proj(attn.v, "v").reshape(b, length, g, HD)
  out = np.zeros((b, length, h, HD))
  allowed = np.tril(np.ones((length, length), bool))[None]
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  for hh in range(h):
    j = hh // (h // g)
    s = np.einsum("bqk,bsk->bqs", q[:, :, hh], k[:, :, j]) / np.sqrt(HD)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, :, hh] = np.einsum("bqs,bsk->bqk", p, v[:, :, j])
  out = out.reshape(b, length, h * HD)
  dense = np_linear(attn.o, out)
  if idx is None:
    return dense
  m = np_mask(idx.o, h * HD)
  return np.concatenate([np_linear(attn.o, out[:, :n_sparse], rowmask=m),
                         dense[:, n_sparse:]], 1)


def np_col_norms(y, mask):
  return np.sqrt(np.einsum("blm,bl->m", y.astype(np.float64) ** 2, mask))


def np_top(score, k):
  return np.sort(np.argsort(-score, kind="stable")[:k])


# ----------------------------------------------------------------------------- estimator


def test_svd_estimator_matches_numpy():
  kern = rand(D, F, seed=1)
  p, q = sl_estimator.svd_estimator(jnp.asarray(kern), rank=8)
  assert p.shape == (D, 8) and q.shape == (8, F) and p.dtype == jnp.float32
  u, s, vt = np.linalg.svd(kern.astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(p @ q, (u[:, :8] * s[:8]) @ vt[:8], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(p.T @ p, np.diag(s[:8]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(q @ q.T, np.diag(s[:8]), rtol=1e-4, atol=1e-4)
  # Columns equal U_r sqrt(s) up to the SVD's sign freedom.
  np.testing.assert_allclose(np.abs(p), np.abs(u[:, :8] * np.sqrt(s[:8])), rtol=1e-4,
                             atol=1e-4)
  assert sl_estimator.estimator_mismatch(jnp.asarray(kern), p, q) < 1e-5
  assert sl_estimator.estimator_mismatch(jnp.asarray(rand(D, F, seed=2)), p, q) > 0.1


def test_estimators_save_load_and_checks(tmp_path, capsys):
  model = lora_model()
  est = sl_estimator.build_estimators(model, rank=8, layers=[1])
  assert set(est) == {"layer_1"} and set(est["layer_1"]) == set(sl_estimator.EST_MODULES)
  assert est["layer_1"]["k"]["q"].shape == (8, 2 * HD)
  path = str(tmp_path / "est.npz")
  sl_estimator.save_estimators(path, est)
  back = sl_estimator.load_estimators(path, model, rank=8)
  for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="rank"):
    sl_estimator.load_estimators(path, rank=4)
  with pytest.raises(ValueError, match="not the estimator"):
    sl_estimator.load_estimators(path, lora_model(seed=7))
  with pytest.raises(ValueError, match="do not fit"):
    sl_estimator.load_estimators(path, lora_model(n_kv_heads=4))
  with pytest.raises(ValueError, match="layers"):
    sl_estimator.load_estimators(path, lora_model(n_layers=1))
  assert os.stat(path).st_mode & 0o777 == 0o644
  # A file torn by a kill mid-write (or any non-estimator file) is DamagedFile; one of another
  # base or rank a plain ValueError. The fine-tune rebuilds either with one line (a checkpoint
  # of another base is refused before, by its fingerprint).
  with open(path, "rb") as f:
    head = f.read(100)
  for torn in (head, b"", b"\x93NUMPY garbage"):
    with open(path, "wb") as f:
      f.write(torn)
    with pytest.raises(sl_estimator.DamagedFile):
      sl_estimator.load_estimators(path, model, rank=8)
  cached = finetune._cached_estimators  # pylint: disable=protected-access
  for other, rank, reason in ((model, 8, "unreadable"), (lora_model(seed=7), 8, "not the estimator"),
                              (model, 4, "estimator rank")):
    assert cached(path, other, rank) is None
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: ") and reason in line, line
    assert line.endswith("; rebuilding it from the base") and "Fix:" not in line, line
    sl_estimator.save_estimators(path, est)


def correlated_inputs(n=4000, d=D, seed=3):
  """Tokens [n, d] with a strongly non-isotropic second moment (a few loud directions)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) * np.geomspace(10.0, 0.05, d)[:, None]
  return rng.normal(size=(n, d)) @ mix


def np_asvd_product(kern, moment, rank, ridge):
  """argmin over rank-r A of ||R (K - A)||_F for R^T R = C_e, by a Cholesky root (any root
  gives the same minimiser, so this is not asvd_estimator's symmetric-root route)."""
  c = moment + ridge * np.trace(moment) / moment.shape[0] * np.eye(moment.shape[0])
  lower = np.linalg.cholesky(c)                         # C_e = L L^T, R = L^T
  u, s, vt = np.linalg.svd(lower.T @ kern, full_matrices=False)
  return np.linalg.solve(lower.T, (u[:, :rank] * s[:rank]) @ vt[:rank])


def test_asvd_estimator_is_the_activation_weighted_best_rank_r():
  kern = rand(D, F, seed=1).astype(np.float64)
  x = correlated_inputs()
  moment = x.T @ x / len(x)
  ridge = sl_estimator.ASVD_RIDGE
  p, q = sl_estimator.asvd_estimator(jnp.asarray(kern), jnp.asarray(moment), rank=8)
  assert p.shape == (D, 8) and q.shape == (8, F) and p.dtype == jnp.float32
  want = np_asvd_product(kern, moment, 8, ridge)
  prod = np.asarray(p, np.float64) @ np.asarray(q, np.float64)
  assert np.linalg.norm(prod - want) / np.linalg.norm(want) < 1e-3
  # Split evenly: Q Q^T = diag(s), s the singular values of C_e^{1/2} K.
  lam, vec = np.linalg.eigh(moment + ridge * np.trace(moment) / D * np.eye(D))
  s = np.linalg.svd((vec * np.sqrt(lam)) @ vec.T @ kern, compute_uv=False)[:8]
  np.testing.assert_allclose(np.asarray(q) @ np.asarray(q).T, np.diag(s), rtol=2e-3,
                             atol=2e-3 * s[0])

  def err(a):   # ||x K - x A|| / ||x K|| on the calibration distribution
    return np.linalg.norm(x @ (kern - a)) / np.linalg.norm(x @ kern)
  ps, qs = sl_estimator.svd_estimator(jnp.asarray(kern), rank=8)
  e_svd, e_asvd = err(np.asarray(ps) @ np.asarray(qs)), err(prod)
  assert e_asvd < 0.6 * e_svd, (e_asvd, e_svd)
  # No rank-8 nudge of the product does better (it is the minimiser, up to the ridge).
  rng = np.random.default_rng(0)
  for _ in range(5):
    a, b = rng.normal(size=(D, 8)), rng.normal(size=(8, F))
    nudged = (np.asarray(p) + 1e-2 * a * np.abs(p).mean()) @ (np.asarray(q) + 1e-2 * b *
                                                                 np.abs(q).mean())
    assert err(nudged) > e_asvd
  # Isotropic inputs: the product is the truncated SVD of K.
  pi, qi = sl_estimator.asvd_estimator(jnp.asarray(kern), jnp.eye(D), rank=8)
  np.testing.assert_allclose(np.asarray(pi) @ np.asarray(qi), np.asarray(ps) @ np.asarray(qs),
                             rtol=1e-3, atol=1e-3)
  with pytest.raises(ValueError, match="moment"):
    sl_estimator.asvd_estimator(jnp.asarray(kern), jnp.eye(D + 1), rank=8)


class _InputRecorder:
  """A dense channel plan keeping each layer's normed attention and MLP inputs."""

  def attention_projection(self, attn, h):
    self.attn = np.asarray(h, np.float64)
    return sl.dense_projection

  def mlp(self, mlp, h):
    self.mlp_in = np.asarray(h, np.float64)
    return mlp(h)


def test_token_mask_and_input_moments_match_numpy():
  seg = np.ones((2, 6), np.int32)
  seg[0, :2] = 0
  np.testing.assert_array_equal(sl_estimator.token_mask(seg, 4, "context"),
                                (seg > 0) & (np.arange(6) < 4)[None, :])
  np.testing.assert_array_equal(sl_estimator.token_mask(seg, 4, "all"), seg > 0)
  model = lora_model()
  b, length = 4, 40                                     # ~190 masked tokens > D: C full rank
  batches = [dict(inputs=np.random.default_rng(i).integers(0, 50, (b, length)).astype(np.int32),
                  positions=np.broadcast_to(np.arange(length), (b, length)).astype(np.int32),
                  segment_ids=np.ones((b, length), np.int32)) for i in range(2)]
  masks = [np.random.default_rng(10 + i).random((b, length)) < 0.6 for i in range(2)]
  got = sl_estimator.input_moments(model, batches, masks, [1])
  assert set(got) == {"layer_1"} and all(np.isfinite(c).all() for c in got["layer_1"].values())
  sums = {"attn": 0.0, "mlp": 0.0}
  for batch, mask in zip(batches, masks):
    recs = [_InputRecorder() for _ in model.layers]
    model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
          jnp.asarray(batch["segment_ids"]), channels=recs)
    sums["attn"] = sums["attn"] + recs[1].attn[mask].T @ recs[1].attn[mask]
    sums["mlp"] = sums["mlp"] + recs[1].mlp_in[mask].T @ recs[1].mlp_in[mask]
  n = sum(m.sum() for m in masks)
  for part in ("attn", "mlp"):
    np.testing.assert_allclose(got["layer_1"][part], sums[part] / n, rtol=1e-4,
                               atol=1e-5 * np.abs(sums[part] / n).max())
  # asvd estimators of those moments: the attention's input feeds q, k, v; the MLP's gate, up.
  est = sl_estimator.build_estimators(model, 4, [1], kind="asvd", moments=got)
  for name in sl_estimator.EST_MODULES:
    kernel = np.asarray(llama_projection(model.layers[1], name).kernel[...], np.float64)
    want = np_asvd_product(kernel, sums[sl_estimator.INPUT_OF[name]] / n, 4,
                           sl_estimator.ASVD_RIDGE)
    prod = np.asarray(est["layer_1"][name]["p"]) @ np.asarray(est["layer_1"][name]["q"])
    assert np.linalg.norm(prod - want) / np.linalg.norm(want) < 2e-3, name
  with pytest.raises(ValueError, match="input moments"):
    sl_estimator.build_estimators(model, 4, [0], kind="asvd", moments=got)


def test_asvd_estimators_save_load_and_refusals(tmp_path, capsys):
  model = lora_model()
  x = correlated_inputs(d=D)
  moments = {"layer_1": {"attn": jnp.asarray(x.T @ x / len(x)), "mlp": jnp.eye(D)}}
  est = sl_estimator.build_estimators(model, 4, [1], kind="asvd", moments=moments)
  path = str(tmp_path / "est.npz")
  calib = {"data": "a", "batches": 2}
  sl_estimator.save_estimators(path, est, kind="asvd", calibration=calib, model=model)
  back = sl_estimator.load_estimators(path, model, 4, kind="asvd", calibration=dict(calib))
  for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  for kw, match in [(dict(kind="svd"), "asvd estimators, requested svd"),
                    (dict(kind="asvd", calibration={"data": "b", "batches": 2}),
                     "other calibration data")]:
    with pytest.raises(ValueError, match=match):
      sl_estimator.load_estimators(path, model, 4, **kw)
  # Another base: the stored kernel sketches differ (asvd factors alone cannot tell).
  with pytest.raises(ValueError, match="not the estimator"):
    sl_estimator.load_estimators(path, lora_model(seed=7), 4, kind="asvd", calibration=calib)
  # The fine-tune rebuilds them, saying why in one line.
  assert finetune._cached_estimators(path, model, 4, "asvd", {"data": "b"}) is None  # pylint: disable=protected-access
  line = capsys.readouterr().out.strip()
  assert "other calibration data" in line and line.endswith("; rebuilding it from the base")
  assert "\n" not in line
  # A plain svd file is svd for a run that asks for asvd: refused, not misread.
  sl_estimator.save_estimators(path, sl_estimator.build_estimators(model, 4, [1]))
  with pytest.raises(ValueError, match="svd estimators, requested asvd"):
    sl_estimator.load_estimators(path, model, 4, kind="asvd", calibration=calib)


# ----------------------------------------------------------------------------- selection


def test_keep_count_and_top_k():
  assert sl_select.keep_count(100, 0.9) == 10          # plain int() would give 9
  assert sl_select.keep_count(96, 0.75) == 24 and sl_select.keep_count(8, 0.99) == 1
  idx = sl_select.top_k_indices(jnp.asarray([0.1, 5.0, 3.0, -1.0, 4.0]), 3)
  np.testing.assert_array_equal(idx, [1, 2, 4])
  assert idx.dtype == jnp.int32


def test_ffn_selection_matches_numpy():
  x = rand(B, L, D, seed=3)
  mask = np.ones((B, L))
  mask[0, :4] = 0                                 # left padding of sequence 0
  est = {n: dict(p=jnp.asarray(rand(D, 8, seed=s)), q=jnp.asarray(rand(8, F, seed=s + 1)))
         for n, s in (("gate", 4), ("up", 6))}
  score = sl_select.ffn_scores(jnp.asarray(x), jnp.asarray(mask), est["gate"], est["up"])
  xbar = np.einsum("bld,bl->bd", x, mask) / mask.sum(1)[:, None]
  p = {n: (np.asarray(e["p"], np.float64), np.asarray(e["q"], np.float64))
       for n, e in est.items()}
  act = np_silu(xbar @ p["gate"][0] @ p["gate"][1]) * (xbar @ p["up"][0] @ p["up"][1])
  want = np.sqrt((act ** 2).sum(0))
  np.testing.assert_allclose(score, want, rtol=1e-4)
  np.testing.assert_array_equal(sl_select.top_k_indices(score, 24), np_top(want, 24))


def test_low_rank_column_norms_match_direct():
  x, mask = rand(B, L, D, seed=8), (rand(B, L, seed=9) > 0).astype(np.float32)
  p, q = rand(D, 8, seed=10), rand(8, F, seed=11)
  got = sl_select.low_rank_column_norms(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(p),
                                 jnp.asarray(q))
  np.testing.assert_allclose(got, np_col_norms(x @ p @ q, mask), rtol=1e-4)


def np_attn_select(qn, kn, vn, h, g, sparsity):
  """Intended GQA mapping, written out channel by channel."""
  grp = h // g
  k = int(np.floor(g * HD * (1 - sparsity) + 1e-6))
  qk = np.zeros(g * HD)
  for j in range(g):
    for d in range(HD):
      qsq = sum(qn[(j * grp + r) * HD + d] ** 2 for r in range(grp))
      qk[j * HD + d] = kn[j * HD + d] * np.sqrt(qsq)
  kv_qk, kv_v = np_top(qk, k), np_top(vn, k)
  expand = lambda kv: np.sort([(c // HD * grp + r) * HD + c % HD for c in kv
                               for r in range(grp)])
  return expand(kv_qk), kv_qk, kv_v, expand(kv_v)


@pytest.mark.parametrize("g", [4, 2])
def test_attention_selection_matches_numpy(g):
  qn, kn, vn = (np.abs(rand(n, seed=s)) for n, s in ((H * HD, 1), (g * HD, 2), (g * HD, 3)))
  got = sl_select.select_attention(jnp.asarray(qn), jnp.asarray(kn), jnp.asarray(vn), 0.75, H, g)
  want = np_attn_select(qn, kn, vn, H, g, 0.75)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert got.k.shape == (g * HD // 4,) and got.q.shape == (H * HD // 4,)
  if g == H:                                      # MHA: the paper's per-channel rule
    np.testing.assert_array_equal(got.q, np_top(qn * kn, got.k.shape[0]))
    np.testing.assert_array_equal(got.o, got.v)


def test_gqa_mapping_differs_from_reference_arithmetic():
  """The reference averages q over view(G, KV*hd) and maps kv channel c to c*G + r."""
  g, grp = 2, H // 2
  qn, kn, vn = (np.abs(rand(n, seed=s)) for n, s in ((H * HD, 21), (g * HD, 22), (g * HD, 23)))
  # Query heads of group 1 (heads 2, 3) dominate: only kv head 1 should win qk channels.
  qn[:2 * HD] *= 1e-3
  got = sl_select.select_attention(jnp.asarray(qn), jnp.asarray(kn), jnp.asarray(vn), 0.5, H, g)
  assert np.all(np.asarray(got.k) >= HD)          # all in kv head 1
  assert np.all(np.asarray(got.q) >= 2 * HD)      # all in query heads 2, 3
  assert got.o.shape == (H * HD // 2,) and got.o.max() < H * HD
  # Reference arithmetic on the same norms picks other channels and a kv-sized o set.
  q_ref = qn.reshape(grp, g * HD).mean(0)
  k_ref = np_top(q_ref * kn, got.k.shape[0])
  q_cols_ref = np.sort((k_ref[:, None] * grp + np.arange(grp)[None]).reshape(-1))
  assert not np.array_equal(k_ref, got.k)
  assert not np.array_equal(q_cols_ref, got.q)
  assert np_top(vn, got.v.shape[0]).shape != got.o.shape
  # A group's score ignores other groups' query heads.
  bumped = qn.copy()
  bumped[3 * HD:] *= 100.0                        # query head 3 (group 1)
  s0 = sl_select.qk_scores(jnp.asarray(qn), jnp.asarray(kn), H, g)
  s1 = sl_select.qk_scores(jnp.asarray(bumped), jnp.asarray(kn), H, g)
  np.testing.assert_array_equal(s0[:HD], s1[:HD])
  assert np.all(np.asarray(s1[HD:]) > np.asarray(s0[HD:]))


# ----------------------------------------------------------------------------- restricted compute


@pytest.mark.parametrize("targets", [(), ("down",), ("gate", "up", "down")])
@pytest.mark.slow
def test_sparse_mlp_matches_masked_kernels(targets):
  model = lora_model(targets=targets, n_layers=1)
  mlp = model.layers[0].mlp
  x = rand(B, L, D, seed=5)
  idx = jnp.asarray(np.sort(np.random.default_rng(0).choice(F, 24, replace=False)), jnp.int32)
  n_sparse = 6
  mask = np_mask(idx, F)
  want = np.concatenate([np_mlp(mlp, x[:, :n_sparse], mask), np_mlp(mlp, x[:, n_sparse:])], 1)
  for how in ("gather", "mask"):
    got = sl_restrict.sparse_mlp(mlp, jnp.asarray(x), idx, n_sparse, how)
    np.testing.assert_allclose(got, want, **TOL)
  # Suffix tokens are dense whatever the index set.
  np.testing.assert_allclose(got[:, n_sparse:], np_mlp(mlp, x[:, n_sparse:]), **TOL)

  # Gradients w.r.t. input and adapters equal those of the masked-kernel dense computation.
  def masked_ref(m, xx):
    mk = jnp.asarray(mask, jnp.float32)
    def lin(l, v, col=None, row=None):
      k = l.kernel[...]
      k = k * col[None] if col is not None else k
      k = k * row[:, None] if row is not None else k
      y = v @ k
      return y + l.delta(v) if isinstance(l, LoRALinear) else y
    def f(v, msk):
      a = jax.nn.silu(lin(m.gate, v, col=msk)) * lin(m.up, v, col=msk)
      return lin(m.down, a, row=msk)
    return jnp.concatenate([f(xx[:, :n_sparse], mk), f(xx[:, n_sparse:], None)], 1)

  w = jnp.asarray(rand(B, L, D, seed=6))
  def loss(fn, m, xx):
    return jnp.sum(fn(m, xx) * w)
  diff = nnx.DiffState(0, LoRAParam)
  sparse = lambda m, xx: sl_restrict.sparse_mlp(m, xx, idx, n_sparse)
  g1 = nnx.jit(nnx.grad(functools.partial(loss, sparse), argnums=(diff, 1)))(mlp, jnp.asarray(x))
  g2 = nnx.jit(nnx.grad(functools.partial(loss, masked_ref), argnums=(diff, 1)))(
      mlp, jnp.asarray(x))
  assert len(jax.tree.leaves(g1[0])) == 2 * len(targets)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, **TOL)


class FixedAttnChannels:
  """A channel plan with given attention indices (what sparselora.LayerChannels selects)."""

  def __init__(self, idx, n_sparse, how):
    self.idx, self.n_sparse, self.how = idx, n_sparse, how

  def attention_projection(self, attn, h):
    return functools.partial(sl_restrict.restricted_projection, idx=self.idx,
                             n_sparse=self.n_sparse, how=self.how)


def sparse_attention(attn, x, idx, n_sparse, pos, seg, how):
  """The model's own attention forward with q/k/v/o restricted on tokens [:n_sparse]."""
  return attn(x, pos, seg, channels=FixedAttnChannels(idx, n_sparse, how))


@pytest.mark.parametrize("g", [4, 2])
@pytest.mark.slow
def test_sparse_attention_matches_masked_kernels(g):
  model = lora_model(n_kv_heads=g, targets=("q", "v", "o"), n_layers=1)
  attn = model.layers[0].attn
  x = rand(B, L, D, seed=12)
  pos = np.broadcast_to(np.arange(L), (B, L))
  n_sparse = 6
  qn, kn, vn = (np.abs(rand(n, seed=s)) for n, s in ((H * HD, 13), (g * HD, 14), (g * HD, 15)))
  idx = sl_select.select_attention(jnp.asarray(qn), jnp.asarray(kn), jnp.asarray(vn), 0.5, H, g)
  want = np_attention(attn, x.astype(np.float64), n_sparse, idx)
  for how in ("gather", "mask"):
    got = sparse_attention(attn, jnp.asarray(x), idx, n_sparse, jnp.asarray(pos), None, how)
    np.testing.assert_allclose(got, want, **TOL)
  dense = np_attention(attn, x.astype(np.float64), n_sparse, None)
  assert np.abs(np.asarray(got) - dense).max() > 1e-3           # sparsity really acted

  # Gradients: gather path vs the masked (dense-then-mask) path.
  w = jnp.asarray(rand(B, L, D, seed=16))
  def loss(how, a, xx):
    return jnp.sum(sparse_attention(a, xx, idx, n_sparse, jnp.asarray(pos), None, how) * w)
  diff = nnx.DiffState(0, LoRAParam)
  g1 = nnx.jit(nnx.grad(functools.partial(loss, "gather"), argnums=(diff, 1)))(
      attn, jnp.asarray(x))
  g2 = nnx.jit(nnx.grad(functools.partial(loss, "mask"), argnums=(diff, 1)))(
      attn, jnp.asarray(x))
  assert len(jax.tree.leaves(g1[0])) == 6
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, **TOL)


# ----------------------------------------------------------------------------- full forward


def batch(seed=0, pad=(3, 0)):
  """Left-padded tokens with positions, segment ids (pads = 0) and validity."""
  toks = np.asarray(jax.random.randint(jax.random.key(seed), (B, L), 1, 50))
  valid = np.ones((B, L), bool)
  for b, p in enumerate(pad):
    valid[b, :p] = False
  pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
  return (jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(valid.astype(np.int32)),
          jnp.asarray(valid))


@pytest.mark.slow
def test_forward_dense_plan_equals_llama():
  model = lora_model()
  toks, pos, seg, _ = batch()
  plan = sl_plan.SparsityPlan.dense(2)
  got = nnx.jit(sl.forward, static_argnums=(3, 4))(model, toks, None, plan, 4, pos, seg)
  np.testing.assert_allclose(got, model(toks, pos, seg), **TOL)
  # dense_len = L: no token is sparse, so a sparse plan is dense too (warm-up steps).
  sparse_plan = sl_plan.SparsityPlan.from_layers(2, 0.5, "0-1", 0.5, "0-1")
  est = sl_estimator.build_estimators(model)
  got = sl.forward(model, toks, est, sparse_plan, L, pos, seg)
  np.testing.assert_allclose(got, model(toks, pos, seg), **TOL)


@pytest.mark.slow
def test_forward_selects_from_valid_context_and_keeps_suffix_dense():
  model = lora_model(n_layers=1)
  toks, pos, seg, valid = batch()
  est = sl_estimator.build_estimators(model)
  plan = sl_plan.SparsityPlan.from_layers(1, ffn=0.75, ffn_layers="0")
  dense_len = 4
  n_sparse = L - dense_len
  logits, idx = sl.forward(model, toks, est, plan, dense_len, pos, seg, return_indices=True)
  dense = model(toks, pos, seg)
  # FFN-only sparsity in a single layer: suffix logits are exactly the dense ones.
  np.testing.assert_allclose(logits[:, n_sparse:], dense[:, n_sparse:], **TOL)
  assert float(jnp.abs(logits[:, :n_sparse] - dense[:, :n_sparse]).max()) > 1e-4
  assert idx[0]["attn"] is None and idx[0]["ffn"].shape == (24,)
  # The index set is the estimator's choice from the valid context tokens only.
  blk = model.layers[0]
  x = model.embed(toks, jnp.float32)
  x = x + blk.attn(blk.attn_norm(x), pos, seg)
  h = np.asarray(blk.mlp_norm(x), np.float64)[:, :n_sparse]
  m = np.asarray(valid, np.float64)[:, :n_sparse]
  xbar = np.einsum("bld,bl->bd", h, m) / m.sum(1)[:, None]
  e = {n: (np.asarray(est["layer_0"][n]["p"]), np.asarray(est["layer_0"][n]["q"]))
       for n in ("gate", "up")}
  act = np_silu(xbar @ e["gate"][0] @ e["gate"][1]) * (xbar @ e["up"][0] @ e["up"][1])
  np.testing.assert_array_equal(idx[0]["ffn"], np_top(np.sqrt((act ** 2).sum(0)), 24))


@pytest.mark.slow
def test_forward_oracle_uses_true_activation_norms():
  model = lora_model(n_layers=1)
  toks, pos, seg, valid = batch(seed=3)
  plan = sl_plan.SparsityPlan.from_layers(1, 0.5, "0", 0.5, "0", mode="oracle")
  n_sparse = L - 2
  _, idx = sl.forward(model, toks, None, plan, 2, pos, seg, return_indices=True)
  attn = model.layers[0].attn
  x = model.embed(toks, jnp.float32)
  h = np.asarray(model.layers[0].attn_norm(x), np.float64)
  m = np.asarray(valid, np.float64)[:, :n_sparse]
  norms = [np_col_norms(np_linear(getattr(attn, n), h[:, :n_sparse]), m) for n in "qkv"]
  want = np_attn_select(*norms, H, 2, 0.5)
  for a, b in zip(idx[0]["attn"], want):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_forward_random_mode_ignores_the_data_scores_and_channel_overlap():
  model = lora_model(n_layers=1)
  toks, pos, seg, _ = batch(seed=3)
  idx = {}
  for mode in ("random", "oracle"):
    plan = sl_plan.SparsityPlan.from_layers(1, 0.5, "0", 0.5, "0", mode=mode)
    _, got = sl.forward(model, toks, None, plan, 2, pos, seg, return_indices=True)
    idx[mode] = got[0]
  f = model.layers[0].mlp.gate.out_features
  rand = np.asarray(idx["random"]["ffn"])
  assert rand.shape == (sl_select.keep_count(f, 0.5),) and np.unique(rand).size == rand.size
  _, again = sl.forward(model, toks, None, sl_plan.SparsityPlan.from_layers(
      1, 0.5, "0", 0.5, "0", mode="random"), 2, pos, seg, return_indices=True)
  np.testing.assert_array_equal(again[0]["ffn"], rand)            # deterministic per batch
  _, other = sl.forward(model, toks % 49 + 1, None, sl_plan.SparsityPlan.from_layers(
      1, 0.5, "0", 0.5, "0", mode="random"), 2, pos, seg, return_indices=True)
  assert not np.array_equal(other[0]["ffn"], rand)                 # and changes with it
  ov = sl_select.channel_overlap(rand, idx["oracle"]["ffn"])
  want = len(set(rand.tolist()) & set(np.asarray(idx["oracle"]["ffn"]).tolist())) / rand.size
  assert ov == want and ov < 1.0
  assert sl_select.channel_overlap(rand, rand[::-1]) == 1.0


@pytest.mark.slow
def test_sparse_forward_grads_only_lora_and_no_full_base_matmul():
  model = lora_model()
  toks, pos, seg, _ = batch()
  est = sl_estimator.build_estimators(model)
  plan = sl_plan.SparsityPlan.from_layers(2, 0.75, "0-1")

  graphdef, lora, rest = nnx.split(model, LoRAParam, ...)

  def loss(lora, rest, e):       # the shape a jitted train step will have
    m = nnx.merge(graphdef, lora, rest)
    return jnp.mean(sl.forward(m, toks, e, plan, 0, pos, seg) ** 2)

  grads = jax.jit(jax.grad(loss))(lora, rest, est)
  assert jax.tree.structure(grads) == jax.tree.structure(lora)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["layers"][0]["attn"]["q"]["lora_b"][...]).max()) > 0
  # With every token sparse, no matmul (forward or backward) touches a full FFN kernel.
  shapes = dot_operand_shapes(jax.make_jaxpr(jax.grad(loss))(lora, rest, est).jaxpr)
  assert (D, 24) in shapes and (24, D) in shapes            # gathered gate/up and down
  assert (D, F) not in shapes and (F, D) not in shapes
  # Per-block remat (pure jax.checkpoint) gives the same gradients under plain jax.grad.
  model.cfg.remat = True
  graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
  remat_grads = jax.jit(jax.grad(loss))(lora, rest, est)
  model.cfg.remat = False
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def dot_operand_shapes(jaxpr) -> set:
  """Shapes of every dot_general operand, including nested (pjit, remat, ...) jaxprs."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.update(tuple(v.aval.shape) for v in eqn.invars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= dot_operand_shapes(sub)
  return out


def test_dense_suffix_len_and_buckets():
  lm = np.zeros((2, 256), bool)
  lm[0, 200:] = True
  lm[1, 230:] = True
  assert sl_plan.dense_suffix_len(lm, 64) == 64
  lm[1, 150:] = True
  assert sl_plan.dense_suffix_len(lm, 64) == 128
  assert sl_plan.dense_suffix_len(lm, 1) == 106
  assert sl_plan.dense_suffix_len(np.zeros((2, 8), bool), 64) == 0
  assert sl_plan.bucket_len(300, 256, 64) == 256
  cfg = configs.finetune_config("quickstart").sparse
  cfg.ffn, cfg.attn = "0.9@1-2", "0.5@3"
  plan = sl_plan.plan_from_config(cfg, 4)
  assert plan.ffn == (0.0, 0.9, 0.9, 0.0) and plan.attn == (0.0, 0.0, 0.0, 0.5)
  assert plan.estimator_layers() == (1, 2, 3) and hash(plan) == hash(sl_plan.SparsityPlan(
      plan.ffn, plan.attn))
  cfg.enabled = False
  assert sl_plan.plan_from_config(cfg, 4) == sl_plan.SparsityPlan.dense(4)
  with pytest.raises(ValueError, match="exceed"):
    sl_plan.SparsityPlan.from_layers(4, 0.5, "2-4")
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    sl_plan.SparsityPlan((1.0,), (0.0,))


def test_wrapper_module_matches_forward():
  model = lora_model()
  est = sl_estimator.build_estimators(model, layers=[1])
  plan = sl_plan.SparsityPlan.from_layers(2, 0.5, "1", 0.5, "1")
  toks, pos, seg, _ = batch()
  wrapped = sl.SparseLoRALlama(model, est, plan)
  assert len(jax.tree.leaves(nnx.state(wrapped, sl.Estimator))) == 10
  assert len(jax.tree.leaves(nnx.state(wrapped, LoRAParam))) == 16
  got = nnx.jit(lambda w, t: w(t, 4, pos, seg))(wrapped, toks)
  np.testing.assert_allclose(got, sl.forward(model, toks, est, plan, 4, pos, seg), **TOL)
  with pytest.raises(ValueError, match="no estimator"):
    sl.forward(model, toks, est, sl_plan.SparsityPlan.from_layers(2, 0.5, "0"), 4)


def test_estimator_tokens_all_scores_every_valid_token():
  model = lora_model()
  mlp = model.layers[0].mlp
  h = rand(2, 10, 64, seed=11)
  valid = np.ones((2, 10), bool)
  valid[0, :3] = False                     # left padding
  n_sparse = 6
  plan = sl_plan.SparsityPlan((0.75, 0.0), (0.0, 0.0), "oracle", estimator_tokens="all")
  ch = sl.LayerChannels(layer=0, plan=plan, estimators=None, n_sparse=n_sparse,
                        valid_BxL=jnp.asarray(valid), how="mask")
  ch.mlp(mlp, jnp.asarray(h))
  k = sl_select.keep_count(96, 0.75)

  def np_top(rows):
    x = np.asarray(h, np.float64)[rows]
    act = np_silu(x @ np.asarray(mlp.gate.kernel[...])) * (x @ np.asarray(mlp.up.kernel[...]))
    return np.sort(np.argsort(-np.sqrt((act * act).sum(0)), kind="stable")[:k])

  np.testing.assert_array_equal(np.asarray(ch.indices["ffn"]), np_top(valid))
  context = valid.copy()
  context[:, n_sparse:] = False
  ctx = sl.LayerChannels(layer=0, plan=sl_plan.SparsityPlan((0.75, 0.0), (0.0, 0.0), "oracle"),
                         estimators=None, n_sparse=n_sparse, valid_BxL=jnp.asarray(valid),
                         how="mask")
  ctx.mlp(mlp, jnp.asarray(h))
  np.testing.assert_array_equal(np.asarray(ctx.indices["ffn"]), np_top(context))
  assert not np.array_equal(np_top(valid), np_top(context))


def test_block_input_grad_leaves_only_the_adapter_gradient_on_the_context():
  model = lora_model()
  q = model.layers[0].attn.q
  x = jnp.asarray(rand(2, 8, 64, seed=12))
  w = jnp.asarray(rand(2, 8, 64, seed=13))
  n_sparse = 5
  cols = jnp.asarray(np.sort(np.random.default_rng(0).choice(64, 16, replace=False)), jnp.int32)
  idx = sl_select.AttnIndices(q=cols, k=cols[:8], v=cols[:8], o=cols)

  def grad_of(fn):
    return np.asarray(jax.grad(lambda v: jnp.sum(fn(v) * w))(x))

  project = functools.partial(sl_restrict.restricted_projection, "q", q, idx=idx,
                              n_sparse=n_sparse)
  blocked = grad_of(lambda v: project(v, block_grad=True))
  passed = grad_of(project)
  delta_only = grad_of(q.delta)
  dense = grad_of(q)
  np.testing.assert_allclose(blocked[:, :n_sparse], delta_only[:, :n_sparse], atol=1e-5)
  np.testing.assert_allclose(blocked[:, n_sparse:], dense[:, n_sparse:], atol=1e-5)
  assert np.abs(passed[:, :n_sparse] - blocked[:, :n_sparse]).max() > 1e-2
  np.testing.assert_array_equal(project(x, block_grad=True), project(x))
