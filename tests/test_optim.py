"""optim: the shared learning rate of embedding / head / norms, against a NumPy AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import tiny_pretrain_config
from lost_jax import configs
from lost_jax.training import optim
from lost_jax.models.llama import Llama


def _tiny(method):
  cfg = tiny_pretrain_config(method, rank=4, seq_len=128,
                             model=dict(d_model=16, ffn_dim=32, n_heads=2, vocab_size=64),
                             steps=10, warmup_frac=0.1, clip_norm=0.0, weight_decay=0.0, lr=2e-3,
                             galore_rank=2, galore_update_freq=5)
  params = nnx.as_pure(nnx.state(Llama(cfg.model, rngs=nnx.Rngs(0)), nnx.Param))
  return cfg, params


def _paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in flat]


def test_block_labels_split_projections_from_shared_parameters():
  _, params = _tiny("lost")
  labels = dict(zip(_paths(params), jax.tree.leaves(optim.block_labels(params))))
  shared = sorted(p for p, block in labels.items() if not block)
  assert shared == ["embed/embedding", "final_norm/scale",
                    "layers/0/attn_norm/scale", "layers/0/mlp_norm/scale",
                    "layers/1/attn_norm/scale", "layers/1/mlp_norm/scale", "lm_head/kernel"]
  assert {p.rsplit("/", 1)[1] for p, block in labels.items() if block} == {"a", "b", "values"}


def _numpy_adamw_two_steps(p0, g1, g2, lr1, b1, b2, eps):
  """AdamW (no decay) after two updates; the first at lr 0 (warmup starts at 0)."""
  m = (1 - b1) * g1
  v = (1 - b2) * g1 ** 2
  m = b1 * m + (1 - b1) * g2
  v = b2 * v + (1 - b2) * g2 ** 2
  mhat, vhat = m / (1 - b1 ** 2), v / (1 - b2 ** 2)
  return p0 - lr1 * mhat / (np.sqrt(vhat) + eps)


@pytest.mark.parametrize("shared_lr", [0.0, 5e-4])
@pytest.mark.slow
def test_shared_lr_is_adamw_at_its_own_peak(shared_lr):
  cfg, params = _tiny("lost")
  t = cfg.train
  t.shared_lr = shared_lr
  tx = optim.make_optimizer(t, params)
  rng = np.random.default_rng(0)
  g1, g2 = (jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                         params) for _ in range(2))
  state = tx.init(params)
  new = params
  for g in (g1, g2):
    upd, state = tx.update(g, state, new)
    new = optax.apply_updates(new, upd)
  frac = float(optim.lr_schedule(t)(1)) / t.lr      # lr(1) / peak, the same for both groups
  blocks = jax.tree.leaves(optim.block_labels(params))
  for p0, a, b, out, block in zip(*(jax.tree.leaves(x) for x in (params, g1, g2, new)),
                                  blocks):
    peak = t.lr if block or not shared_lr else shared_lr
    want = _numpy_adamw_two_steps(np.float64(p0), np.float64(a), np.float64(b), peak * frac,
                                  t.b1, t.b2, t.eps)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=0, atol=1e-7)


@pytest.mark.slow
def test_shared_lr_under_galore_scales_only_the_unprojected_parameters():
  cfg, params = _tiny("galore")
  g = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, jnp.float32), params)

  def second_update(shared_lr):
    cfg.train.shared_lr = shared_lr
    tx = optim.make_optimizer(cfg.train, params)
    state = tx.init(params)
    _, state = tx.update(g, state, params)
    upd, _ = tx.update(g, state, params)
    return jax.tree.leaves(upd)

  base, shared = second_update(0.0), second_update(5e-4)
  for u0, u1, block in zip(base, shared, jax.tree.leaves(optim.block_labels(params))):
    np.testing.assert_allclose(u1, u0 if block else u0 * (5e-4 / cfg.train.lr), rtol=1e-6)
  assert any(float(jnp.abs(u).max()) > 0 for u in base)
  cfg.train.shared_lr = -1.0
  with pytest.raises(ValueError, match=r"config\.train\.shared_lr: -1\.0 .*Fix"):
    configs.validate_train(cfg.train)


@pytest.mark.parametrize("scale", [0.1, 10.0])           # below and above max_norm
def test_clip_by_global_norm_matches_numpy_with_and_without_a_given_norm(scale):
  rng = np.random.default_rng(5)
  grads = {"a": scale * rng.normal(size=(4, 3)), "b": scale * rng.normal(size=(5,))}
  norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
  want = {k: g * min(1.0, 1.0 / norm) for k, g in grads.items()}
  tx = optim.clip_by_global_norm(1.0)
  g32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
  state = tx.init(g32)
  assert state == optax.clip_by_global_norm(1.0).init(g32)    # checkpoints keep their layout
  for kw in ({}, {"grad_norm": jnp.float32(norm)}):
    got, _ = tx.update(g32, state, **kw)
    for k in grads:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
  # The given norm is what is used (a wrong one would scale by it).
  got, _ = tx.update(g32, state, grad_norm=jnp.float32(2 * norm))
  np.testing.assert_allclose(got["a"], grads["a"] * min(1.0, 1.0 / (2 * norm)), rtol=1e-6)


@pytest.mark.parametrize("method", ["lost", "galore"])
@pytest.mark.slow
def test_the_optimizer_given_the_grad_norm_updates_as_without_it(method):
  cfg, params = _tiny(method)
  cfg.train.clip_norm = 1.0
  tx = optim.make_optimizer(cfg.train, params)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 5.0 * p + 0.1, params)     # global norm well above 1
  norm = optax.tree.norm(grads)
  # Adam's first moment holds (1 - b1) x the clipped gradients: it shows the clip used.
  _, plain = tx.update(grads, state, params)
  _, given = tx.update(grads, state, params, grad_norm=norm)
  _, off = tx.update(grads, state, params, grad_norm=norm / 100)   # a wrong norm clips more
  for a, b, c in zip(*map(jax.tree.leaves, (plain, given, off))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  assert any(not np.allclose(a, c) for a, c in zip(*map(jax.tree.leaves, (plain, off))))
