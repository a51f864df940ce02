"""Linear layers (LOST, dense, low-rank/CoLA, SLTrain) against float64 NumPy forwards and grads."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lost_jax
from helpers import np_silu, np_silu_grad, tiny_model_config
from lost_jax import DenseLinear, LOSTLinear, LowRankLinear, SLTrainLinear, configs, errors
from lost_jax.layers.linear import StaticIndices
from lost_jax.models.llama import Llama

N, M, R = 24, 16, 4


NP_ACT = {"silu": (np_silu, np_silu_grad), "identity": (lambda h: h, np.ones_like)}


def f64(v) -> np.ndarray:
  return np.asarray(v, np.float64)


def assert_close(got, ref, rtol=1e-5):
  """float32 result vs float64 reference; atol scaled to the reference's magnitude."""
  ref = np.asarray(ref)
  np.testing.assert_allclose(f64(got), ref, rtol=rtol, atol=rtol * max(np.abs(ref).max(), 1e-30))


def num_params(layer) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))


def param_names(state) -> set:
  return {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}


def distinct_sorted(rng, high, k) -> np.ndarray:
  return np.sort(rng.choice(high, size=k, replace=False)).astype(np.int32)


def set_lost_params(layer, rng, k):
  """Overwrite a LOSTLinear's a, b, indices, values with known random arrays; return them."""
  a = rng.standard_normal((N, R)).astype(np.float32) / np.sqrt(N)
  b = rng.standard_normal((M, R)).astype(np.float32)
  idx = distinct_sorted(rng, N, k)
  vals = rng.standard_normal((k, M)).astype(np.float32)
  layer.a[...] = jnp.asarray(a)
  layer.b[...] = jnp.asarray(b)
  layer.indices[...] = jnp.asarray(idx)
  layer.values[...] = jnp.asarray(vals)
  return a, b, idx, vals


def np_lost_forward(x, a, b, idx, vals, gamma, activation):
  act, _ = NP_ACT[activation]
  x, a, b, vals = f64(x), f64(a), f64(b), f64(vals)
  return gamma * act(x @ a) @ b.T + (1.0 - gamma) * x[..., idx] @ vals


def lost_layer(**kw):
  kw = dict(dict(rank=R, sparsity=0.25, rngs=nnx.Rngs(0)), **kw)
  return LOSTLinear(N, M, **kw)


# ----------------------------------------------------------------------------- LOSTLinear


def test_lost_layer_structure():
  layer = lost_layer()
  k = math.ceil(0.25 * N)
  assert layer.a.shape == (N, R) and layer.b.shape == (M, R)
  assert layer.indices.shape == (k,) and layer.values.shape == (k, M)
  assert layer.a.dtype == layer.b.dtype == layer.values.dtype == jnp.float32
  assert layer.indices.dtype == jnp.int32
  idx = np.asarray(layer.indices[...])
  assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < N
  assert isinstance(layer.indices, StaticIndices)
  assert not issubclass(StaticIndices, nnx.Param)
  assert issubclass(StaticIndices, nnx.Variable)
  assert isinstance(layer.a, nnx.Param) and isinstance(layer.b, nnx.Param)
  assert isinstance(layer.values, nnx.Param)
  assert param_names(nnx.state(layer, nnx.Param)) == {"a", "b", "values"}
  assert lost_jax.LOSTLinear is LOSTLinear


@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("gamma", [0.0, 0.7, 1.0])
def test_lost_forward_matches_numpy(activation, gamma):
  layer = lost_layer(gamma=gamma, activation=activation)
  rng = np.random.default_rng(1)
  a, b, idx, vals = set_lost_params(layer, rng, k=6)
  x = rng.standard_normal((2, 3, N)).astype(np.float32)
  y = layer(jnp.asarray(x))
  assert y.shape == (2, 3, M) and y.dtype == jnp.float32
  assert_close(y, np_lost_forward(x, a, b, idx, vals, gamma, activation))


def test_lost_forward_uses_unsorted_gather_order_as_given():
  """The gather is x[..., I]: row t of values pairs with input channel I[t]."""
  layer = lost_layer(gamma=0.0, activation="identity")
  rng = np.random.default_rng(2)
  _, _, _, vals = set_lost_params(layer, rng, k=6)
  idx = np.array([20, 3, 11, 0, 7, 23], np.int32)
  layer.indices[...] = jnp.asarray(idx)
  x = rng.standard_normal((5, N)).astype(np.float32)
  assert_close(layer(jnp.asarray(x)), f64(x)[:, idx] @ f64(vals))


def test_lost_forward_under_jit_matches_eager():
  layer = lost_layer()
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, N)), jnp.float32)
  graphdef, state = nnx.split(layer)

  @jax.jit
  def apply(state, x):
    return nnx.merge(graphdef, state)(x)

  np.testing.assert_allclose(np.asarray(apply(state, x)), np.asarray(layer(x)), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_lost_gradients_match_numpy(activation):
  gamma = 0.7
  layer = lost_layer(gamma=gamma, activation=activation)
  rng = np.random.default_rng(4)
  a, b, idx, vals = set_lost_params(layer, rng, k=6)
  x = rng.standard_normal((2, 3, N)).astype(np.float32)
  w = rng.standard_normal((2, 3, M)).astype(np.float32)

  def loss(layer, x, w):
    return jnp.sum(layer(x) * w)

  grads = nnx.grad(loss)(layer, jnp.asarray(x), jnp.asarray(w))
  assert param_names(grads) == {"a", "b", "values"}
  # L = sum(w * y): closed-form gradients in float64.
  x2, w2 = f64(x).reshape(-1, N), f64(w).reshape(-1, M)
  act, dact = NP_ACT[activation]
  h = x2 @ f64(a)
  d_h = gamma * (w2 @ f64(b)) * dact(h)
  assert_close(grads["a"][...], x2.T @ d_h)
  assert_close(grads["b"][...], gamma * w2.T @ act(h))
  assert_close(grads["values"][...], (1.0 - gamma) * x2[:, idx].T @ w2)


@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_lost_mix_and_its_gradient_match_numpy(activation, out_dtype):
  rank, gamma = 5, 0.7
  rng = np.random.default_rng(11)
  z, dh = rng.normal(scale=3.0, size=(2, 4, 8)), rng.normal(size=(2, 4, 8))
  f = lambda z: lost_jax.layers.lost.lost_mix(z, rank, gamma, activation, jnp.dtype(out_dtype))
  h = jax.jit(f)(jnp.asarray(z, jnp.float32))
  dz = jax.grad(lambda z: jnp.sum(f(z).astype(jnp.float32) * dh))(jnp.asarray(z, jnp.float32))
  assert h.dtype == jnp.dtype(out_dtype) and dz.dtype == jnp.float32
  act, dact = NP_ACT[activation]
  want_h = np.concatenate([gamma * act(z[..., :rank]), (1 - gamma) * z[..., rank:]], -1)
  want_dz = np.concatenate([gamma * dh[..., :rank] * dact(z[..., :rank]),
                            (1 - gamma) * dh[..., rank:]], -1)
  tol = 1e-5 if out_dtype == "float32" else 1e-2     # bf16: h and its cotangent rounded once
  np.testing.assert_allclose(np.asarray(h, np.float64), want_h, rtol=tol, atol=tol)
  np.testing.assert_allclose(dz, want_dz, rtol=tol, atol=tol)


def test_lost_gradients_via_split_merge_exclude_indices():
  layer = lost_layer()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  assert "indices" not in param_names(params)
  assert "indices" in param_names(rest)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, N)), jnp.float32)

  @jax.jit
  def loss(params, rest):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

  grads = jax.grad(loss)(params, rest)
  assert param_names(grads) == {"a", "b", "values"}
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf))) and np.abs(np.asarray(leaf)).max() > 0


@pytest.mark.parametrize("n,m,rank,sparsity", [
    (24, 16, 4, 0.25), (30, 20, 2, 0.1), (24, 40, 8, 0.01), (16, 16, 16, 1.0)])
def test_lost_parameter_count(n, m, rank, sparsity):
  layer = LOSTLinear(n, m, rank=rank, sparsity=sparsity, rngs=nnx.Rngs(0))
  k = max(1, math.ceil(sparsity * n))
  assert num_params(layer) == rank * (n + m) + k * m


@pytest.mark.parametrize("init", ["kaiming", "normal"])
@pytest.mark.parametrize("sparse_init", ["complement", "weight", "random_channels"])
def test_fresh_lost_layer_is_an_svd_split(init, sparse_init):
  """a = U sqrt(s), b = V sqrt(s): a^T a = b^T b = diag(s_r) with s descending."""
  layer = lost_layer(init=init, sparse_init=sparse_init)
  a, b = f64(layer.a[...]), f64(layer.b[...])
  ata, btb = a.T @ a, b.T @ b
  tol = 1e-5 * np.abs(ata).max()
  np.testing.assert_allclose(ata, np.diag(np.diag(ata)), rtol=0, atol=tol)
  np.testing.assert_allclose(btb, ata, rtol=0, atol=tol)
  s_r = np.diag(ata)
  assert np.all(s_r > 0) and np.all(np.diff(s_r) <= tol)
  idx = np.asarray(layer.indices[...])
  assert idx.shape == (6,) and np.all(np.diff(idx) > 0) and 0 <= idx.min() and idx.max() < N
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3, N)), jnp.float32)
  plain = lost_layer(init=init, sparse_init=sparse_init, gamma=1.0, activation="identity")
  assert_close(plain(x), f64(x) @ f64(plain.a[...]) @ f64(plain.b[...]).T)


@pytest.mark.parametrize("init", ["kaiming", "normal"])
def test_fresh_lost_layer_keeping_every_channel_reconstructs_its_kernel(init):
  """With sparsity 1 the layer holds K0 = a b^T + K_c, and lost_split(K0) gives it back."""
  n, m, r = 64, 48, 8
  layer = LOSTLinear(n, m, rank=r, sparsity=1.0, init=init, rngs=nnx.Rngs(7))
  np.testing.assert_array_equal(np.asarray(layer.indices[...]), np.arange(n))
  a, b, vals = f64(layer.a[...]), f64(layer.b[...]), f64(layer.values[...])
  k0 = a @ b.T + vals
  u, s, vt = np.linalg.svd(k0)
  tol = 3e-5 * s[0]
  np.testing.assert_allclose(a @ b.T, (u[:, :r] * s[:r]) @ vt[:r], rtol=0, atol=tol)
  np.testing.assert_allclose(np.diag(a.T @ a), s[:r], rtol=0, atol=tol)
  again = lost_jax.lost_split(k0.astype(np.float32), r, 1.0)
  np.testing.assert_allclose(f64(again.values), vals, rtol=0, atol=tol)
  if init == "normal":
    assert abs(k0.std() / 0.02 - 1.0) < 0.1


def test_fresh_lost_layer_weight_sparse_init_holds_the_kernel_rows():
  n, m, r = 64, 48, 8
  layer = LOSTLinear(n, m, rank=r, sparsity=1.0, init="normal", sparse_init="weight",
                     rngs=nnx.Rngs(8))
  k0 = f64(layer.values[...])
  assert abs(k0.std() / 0.02 - 1.0) < 0.1
  u, s, vt = np.linalg.svd(k0)
  np.testing.assert_allclose(f64(layer.a[...]) @ f64(layer.b[...]).T,
                             (u[:, :r] * s[:r]) @ vt[:r], rtol=0, atol=3e-5 * s[0])


def test_kaiming_init_scales_with_fan_in():
  """Any fan-in Kaiming variant: the kernel std halves when the fan-in quadruples."""
  def kernel_std(n):
    layer = LOSTLinear(n, 64, rank=4, sparsity=1.0, init="kaiming", sparse_init="weight",
                       rngs=nnx.Rngs(9))
    return f64(layer.values[...]).std()
  assert abs(kernel_std(256) / kernel_std(64) - 0.5) < 0.05


@pytest.mark.parametrize("complement_rank,expected", [(None, 48 - 8), (5, 5)])
def test_lost_layer_complement_rank(complement_rank, expected):
  """With every channel kept the complement values have rank c."""
  layer = LOSTLinear(64, 48, rank=8, sparsity=1.0, complement_rank=complement_rank,
                     rngs=nnx.Rngs(10))
  s = np.linalg.svd(f64(layer.values[...]), compute_uv=False)
  assert np.sum(s > 1e-4 * s[0]) == expected


# ------------------------------------------------------------------------------ baselines


def test_dense_kaiming_init_is_the_weight_lost_decomposes():
  """dense init=kaiming draws U(+-1/sqrt(n)) from the layer's one key: the very K0 a LOST
  layer of the same key splits (sparsity 1 keeps all of it: K0 = a b^T + values)."""
  n, m, r = 64, 48, 8
  dense = DenseLinear(n, m, init="kaiming", rngs=nnx.Rngs(7))
  lost = LOSTLinear(n, m, rank=r, sparsity=1.0, init="kaiming", rngs=nnx.Rngs(7))
  k0 = f64(lost.a[...]) @ f64(lost.b[...]).T + f64(lost.values[...])
  kernel = f64(dense.kernel[...])
  np.testing.assert_allclose(kernel, k0, rtol=0, atol=1e-5 / math.sqrt(n))
  bound = 1.0 / math.sqrt(n)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  assert abs(kernel.std() * math.sqrt(3 * n) - 1.0) < 0.05     # U(-b, b): std b / sqrt(3)
  normal = f64(DenseLinear(n, m, rngs=nnx.Rngs(7)).kernel[...])
  assert abs(normal.std() / 0.02 - 1.0) < 0.1 and np.abs(normal - kernel).max() > 0.01


def test_full_rank_model_with_kaiming_init_starts_from_lost_weights():
  """Every projection of a dense model with linear.dense_init=kaiming is the weight the LOST
  model of the same seed decomposes; everything else (embedding, norms, head) is identical."""
  dense_cfg = tiny_model_config("dense", dtype="float32")
  dense_cfg.linear.dense_init = "kaiming"
  lost_cfg = tiny_model_config("lost", rank=4, dtype="float32")
  lost_cfg.linear.sparsity = 1.0
  dense, lost = Llama(dense_cfg, rngs=nnx.Rngs(3)), Llama(lost_cfg, rngs=nnx.Rngs(3))
  plain = Llama(tiny_model_config("dense", dtype="float32"), rngs=nnx.Rngs(3))
  checked = 0
  for i, (dl, ll, pl) in enumerate(zip(dense.layers, lost.layers, plain.layers)):
    for part, name in [(p, q) for p in ("attn", "mlp") for q in ("q", "k", "v", "o", "gate",
                                                                  "up", "down")
                       if hasattr(getattr(dl, p), q)]:
      d, lo = getattr(getattr(dl, part), name), getattr(getattr(ll, part), name)
      k0 = f64(lo.a[...]) @ f64(lo.b[...]).T + f64(lo.values[...])
      np.testing.assert_allclose(f64(d.kernel[...]), k0, rtol=0, atol=2e-5, err_msg=f"{i}.{name}")
      assert not np.allclose(f64(getattr(getattr(pl, part), name).kernel[...]), k0, atol=1e-3)
      checked += 1
  assert checked == 7 * len(dense.layers)
  for get in (lambda mdl: mdl.embed, lambda mdl: mdl.lm_head, lambda mdl: mdl.final_norm):
    a, b = nnx.state(get(dense), nnx.Param), nnx.state(get(lost), nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unknown_dense_init_is_refused_in_one_line():
  cfg = tiny_model_config("dense")
  configs.validate_model(cfg)
  cfg.linear.dense_init = "xavier"
  with pytest.raises(errors.UserError, match=r"model\.linear\.dense_init.*Fix"):
    configs.validate_model(cfg)


def test_dense_linear():
  layer = DenseLinear(64, 48, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (64, 48) and layer.kernel.dtype == jnp.float32
  assert num_params(layer) == 64 * 48
  assert abs(f64(layer.kernel[...]).std() / 0.02 - 1.0) < 0.1
  wide = DenseLinear(64, 48, init_std=0.1, rngs=nnx.Rngs(0))
  assert abs(f64(wide.kernel[...]).std() / 0.1 - 1.0) < 0.1
  rng = np.random.default_rng(11)
  k = rng.standard_normal((64, 48)).astype(np.float32)
  layer.kernel[...] = jnp.asarray(k)
  x = rng.standard_normal((2, 3, 64)).astype(np.float32)
  assert_close(layer(jnp.asarray(x)), f64(x) @ f64(k))


@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_low_rank_linear(activation):
  layer = LowRankLinear(N, M, rank=R, activation=activation, rngs=nnx.Rngs(0))
  assert layer.a.shape == (N, R) and layer.b.shape == (M, R)
  assert num_params(layer) == R * (N + M)
  assert param_names(nnx.state(layer, nnx.Param)) == {"a", "b"}
  assert np.abs(f64(layer.a[...])).max() > 0 and np.abs(f64(layer.b[...])).max() > 0
  rng = np.random.default_rng(12)
  a = rng.standard_normal((N, R)).astype(np.float32)
  b = rng.standard_normal((M, R)).astype(np.float32)
  layer.a[...] = jnp.asarray(a)
  layer.b[...] = jnp.asarray(b)
  x = rng.standard_normal((2, 3, N)).astype(np.float32)
  act, _ = NP_ACT[activation]
  assert_close(layer(jnp.asarray(x)), act(f64(x) @ f64(a)) @ f64(b).T)


def test_low_rank_default_activation_is_identity():
  layer = LowRankLinear(N, M, rank=R, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(13).standard_normal((3, N)), jnp.float32)
  assert_close(layer(x), f64(x) @ f64(layer.a[...]) @ f64(layer.b[...]).T)


def sl_layer(**kw):
  kw = dict(dict(rank=R, density=0.05, alpha=8.0, rngs=nnx.Rngs(0)), **kw)
  return SLTrainLinear(N, M, **kw)


@pytest.mark.parametrize("density,nnz", [(0.05, 19), (0.03, 12), (0.5, 192)])
def test_sltrain_structure(density, nnz):
  assert round(density * N * M) == nnz
  layer = sl_layer(density=density)
  assert isinstance(layer.indices, StaticIndices)
  assert layer.indices.shape == (nnz,) and layer.indices.dtype == jnp.int32
  assert layer.values.shape == (nnz,) and layer.values.dtype == jnp.float32
  idx = np.asarray(layer.indices[...])
  assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < N * M
  assert param_names(nnx.state(layer, nnx.Param)) == {"a", "b", "values"}
  assert num_params(layer) == R * (N + M) + nnz


def test_sltrain_support_is_random():
  one = np.asarray(sl_layer(rngs=nnx.Rngs(0)).indices[...])
  two = np.asarray(sl_layer(rngs=nnx.Rngs(1)).indices[...])
  assert not np.array_equal(one, two)
  assert one.max() >= 19  # not simply the first nnz entries


def set_sl_params(layer, rng):
  a = rng.standard_normal((N, R)).astype(np.float32)
  b = rng.standard_normal((M, R)).astype(np.float32)
  nnz = layer.values.shape[0]
  idx = distinct_sorted(rng, N * M, nnz)
  vals = rng.standard_normal(nnz).astype(np.float32)
  layer.a[...] = jnp.asarray(a)
  layer.b[...] = jnp.asarray(b)
  layer.indices[...] = jnp.asarray(idx)
  layer.values[...] = jnp.asarray(vals)
  return a, b, idx, vals


def np_sparse(idx, vals):
  s = np.zeros(N * M)
  s[idx] = f64(vals)
  return s.reshape(N, M)  # row-major: flat index = row * M + col


def test_sltrain_forward_matches_numpy():
  alpha = 8.0
  layer = sl_layer(alpha=alpha)
  rng = np.random.default_rng(14)
  a, b, idx, vals = set_sl_params(layer, rng)
  x = rng.standard_normal((2, 3, N)).astype(np.float32)
  kernel = f64(a) @ f64(b).T * (alpha / R) + np_sparse(idx, vals)
  y = layer(jnp.asarray(x))
  assert y.shape == (2, 3, M)
  assert_close(y, f64(x) @ kernel)


def test_sltrain_gradients_match_numpy():
  alpha = 8.0
  layer = sl_layer(alpha=alpha)
  rng = np.random.default_rng(15)
  a, b, idx, _ = set_sl_params(layer, rng)
  x = rng.standard_normal((2, 3, N)).astype(np.float32)
  w = rng.standard_normal((2, 3, M)).astype(np.float32)
  grads = nnx.grad(lambda layer, x, w: jnp.sum(layer(x) * w))(
      layer, jnp.asarray(x), jnp.asarray(w))
  assert param_names(grads) == {"a", "b", "values"}
  d_kernel = f64(x).reshape(-1, N).T @ f64(w).reshape(-1, M)  # dL/dK for L = sum(w * x K)
  scale = alpha / R
  assert_close(grads["values"][...], d_kernel.reshape(-1)[idx])
  assert_close(grads["a"][...], scale * d_kernel @ f64(b))
  assert_close(grads["b"][...], scale * d_kernel.T @ f64(a))


# ---------------------------------------------------------------------------------- dtypes


def build(kind, **kw):
  rngs = nnx.Rngs(0)
  if kind == "dense":
    return DenseLinear(N, M, rngs=rngs, **kw)
  if kind == "lost":
    return LOSTLinear(N, M, rank=R, sparsity=0.25, rngs=rngs, **kw)
  if kind == "low_rank":
    return LowRankLinear(N, M, rank=R, rngs=rngs, **kw)
  if kind == "cola":
    return LowRankLinear(N, M, rank=R, activation="silu", rngs=rngs, **kw)
  if kind == "sltrain":
    return SLTrainLinear(N, M, rank=R, rngs=rngs, **kw)
  raise ValueError(kind)


KINDS = ["dense", "lost", "low_rank", "cola", "sltrain"]


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_compute_keeps_fp32_params(kind):
  layer = build(kind, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param)):
    assert leaf.dtype == jnp.float32
  x = jnp.asarray(np.random.default_rng(16).standard_normal((2, 3, N)), jnp.float32)
  y = layer(x)
  assert y.shape == (2, 3, M) and y.dtype == jnp.bfloat16
  # bf16 compute stays close to the fp32 forward of the same parameters.
  ref = build(kind)(x)
  assert ref.dtype == jnp.float32
  np.testing.assert_allclose(f64(y), f64(ref), rtol=0, atol=0.05 * np.abs(f64(ref)).max())


@pytest.mark.parametrize("kind", KINDS)
def test_indices_are_never_params(kind):
  layer = build(kind)
  names = param_names(nnx.state(layer, nnx.Param))
  assert "indices" not in names
  for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param)):
    assert jnp.issubdtype(leaf.dtype, jnp.floating)


def test_random_factor_init_ablation_keeps_the_sparse_part():
  """factor_init='random' replaces only A, B; indices and values still come from the SVD."""
  svd = lost_jax.LOSTLinear(48, 40, rank=6, sparsity=0.1, rngs=nnx.Rngs(3))
  rnd = lost_jax.LOSTLinear(48, 40, rank=6, sparsity=0.1, factor_init="random",
                            rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(np.asarray(svd.indices[...]), np.asarray(rnd.indices[...]))
  np.testing.assert_allclose(np.asarray(svd.values[...]), np.asarray(rnd.values[...]))
  assert rnd.a.shape == svd.a.shape and rnd.b.shape == svd.b.shape
  prod = np.asarray(rnd.a[...]) @ np.asarray(rnd.b[...]).T
  truncation = np.asarray(svd.a[...]) @ np.asarray(svd.b[...]).T
  assert not np.allclose(prod, truncation, atol=1e-3)
  np.testing.assert_allclose(np.std(np.asarray(rnd.a[...])), (6 * 88) ** -0.25, rtol=0.2)


@pytest.mark.parametrize("variant", [dict(sparse_init="random_channels"),
                                     dict(factor_init="random")])
@pytest.mark.slow
def test_lost_variants_keep_every_other_initialisation(variant):
  """An ablation changes only its own choice: the models' key streams stay aligned, so every
  parameter the variant does not redefine starts identical to LOST's, in every layer."""
  cfg = lost_jax.configs.pretrain_config("quickstart", "lost").model
  cfg.update(d_model=32, ffn_dim=64, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=64)
  cfg.linear.update(rank=4, sparsity=0.25)    # 8 of 32 channels: a random draw differs
  ref = nnx.state(lost_jax.Llama(cfg, rngs=nnx.Rngs(0)))
  cfg.linear.update(variant)
  alt = nnx.state(lost_jax.Llama(cfg, rngs=nnx.Rngs(0)))
  changed = {"a", "b"} if "factor_init" in variant else {"indices", "values"}
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(nnx.as_pure(ref))[0])
  flat_alt = dict(jax.tree_util.tree_flatten_with_path(nnx.as_pure(alt))[0])
  differ = set()
  for path, x in flat_ref.items():
    name = str(getattr(path[-1], "key", path[-1]))
    if not np.array_equal(np.asarray(x), np.asarray(flat_alt[path])):
      differ.add(name)
    elif name in changed:
      raise AssertionError(f"{path} did not change under {variant}")
  assert differ == changed
