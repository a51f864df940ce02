"""LoRA adapters: layer math vs NumPy, init, gradient filtering, merge for export."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import adapter_model_config, randomize_lora
from lost_jax.layers.linear import DenseLinear
from lost_jax.adapters import lora
from lost_jax.adapters.lora import LoRALinear, LoRAParam, apply_lora, lora_targets, merge_lora
from lost_jax.models.llama import Llama


@nnx.jit
def logits_of(model, toks):
  return model(toks)


def tokens(b=2, length=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, length), 0, 50)


def test_lora_linear_matches_numpy_and_init():
  base = DenseLinear(64, 96, rngs=nnx.Rngs(0))
  lin = LoRALinear(base, rank=8, alpha=16.0, rngs=nnx.Rngs(1))
  a = np.asarray(lin.lora_a[...])
  bound = 1.0 / math.sqrt(64)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound     # U(+-1/sqrt(n))
  assert np.all(np.asarray(lin.lora_b[...]) == 0.0)
  assert lin.lora_a.get_metadata()["axes"] == ("embed", "rank")
  assert lin.lora_b.get_metadata()["axes"] == ("rank", "mlp")
  b = np.random.default_rng(0).normal(size=(8, 96)).astype(np.float32)
  lin.lora_b[...] = jnp.asarray(b)
  x = np.random.default_rng(1).normal(size=(3, 5, 64)).astype(np.float32)
  want = x @ np.asarray(base.kernel[...]) + 2.0 * (x @ a) @ b
  np.testing.assert_allclose(lin(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_apply_lora_targets_start_as_identity():
  model = Llama(adapter_model_config(), rngs=nnx.Rngs(0))
  toks = tokens()
  before = logits_of(model, toks)
  apply_lora(model, ("q", "v", "gate", "down"), rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  assert lora_targets(model) == ("q", "v", "gate", "down")
  assert isinstance(model.layers[1].attn.k, DenseLinear)
  assert isinstance(model.layers[1].mlp.down, LoRALinear)
  # Base kernels keep their nnx.Param type and state path.
  assert type(model.layers[0].attn.q.kernel) is nnx.Param
  np.testing.assert_array_equal(logits_of(model, toks), before)     # lora_b = 0
  with pytest.raises(ValueError, match="unknown"):
    apply_lora(model, ("qq",), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="DenseLinear"):
    apply_lora(model, ("q",), rngs=nnx.Rngs(0))           # already wrapped


@pytest.mark.slow
def test_only_lora_params_get_gradients_and_updates():
  model = Llama(adapter_model_config(), rngs=nnx.Rngs(0))
  apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  randomize_lora(model)
  toks = tokens()

  def loss_fn(m):
    logits = m(toks)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:]).mean()

  grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam)))(model)
  paths = {p for p, _ in jax.tree.leaves_with_path(grads)}
  want = {p for p, _ in jax.tree.leaves_with_path(nnx.state(model, LoRAParam))}
  assert paths == want and len(want) == 2 * 4 * 2
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

  # A pure jitted step on the split state: the frozen rest is bit-identical afterwards.
  graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
  tx = optax.adam(1e-2)
  opt = tx.init(lora)

  @jax.jit
  def step(lora, rest, opt):
    g = jax.grad(lambda l: loss_fn(nnx.merge(graphdef, l, rest)))(lora)
    upd, opt = tx.update(g, opt, lora)
    return optax.apply_updates(lora, upd), opt

  new_lora, _ = step(lora, rest, opt)
  model2 = nnx.merge(graphdef, new_lora, rest)
  base = nnx.state(model2, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(rest)):
    np.testing.assert_array_equal(x, y)
  assert float(nnx.jit(loss_fn)(model2)) < float(nnx.jit(loss_fn)(model))


@pytest.mark.slow
def test_merge_lora_same_logits():
  model = Llama(adapter_model_config(), rngs=nnx.Rngs(0))
  apply_lora(model, ("q", "k", "v", "o", "gate", "up", "down"), rank=4, alpha=8.0,
             rngs=nnx.Rngs(1))
  randomize_lora(model, std=0.2)
  toks = tokens()
  adapted = logits_of(model, toks)
  merge_lora(model)
  assert lora_targets(model) == ()
  assert not jax.tree.leaves(nnx.state(model, LoRAParam))
  assert model.layers[0].attn.k.kernel.get_metadata()["axes"] == ("embed", "kv_heads")
  np.testing.assert_allclose(logits_of(model, toks), adapted, rtol=1e-4, atol=1e-4)


def test_lora_dropout_train_vs_eval():
  base = DenseLinear(64, 32, rngs=nnx.Rngs(0))
  lin = LoRALinear(base, rank=4, alpha=4.0, dropout=0.5, rngs=nnx.Rngs(1))
  lin.lora_b[...] = jnp.ones((4, 32))
  x = jnp.ones((2, 64))
  train = lin(x)
  lin.eval()
  evaluated = lin(x)
  want = np.asarray(x @ base.kernel[...] + (x @ lin.lora_a[...]) @ lin.lora_b[...])
  np.testing.assert_allclose(evaluated, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(train - evaluated).max()) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_delta_forward_and_gradients_match_numpy(dtype):
  """lora_delta's custom backward against the closed-form gradients (NumPy, float64)."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 7, 12))
  a, b = rng.standard_normal((12, 4)), rng.standard_normal((4, 9))
  c = rng.standard_normal((2, 7, 9))
  scale = 0.75
  cast = lambda t: jnp.asarray(t, dtype)

  def loss(x, a, b):
    return jnp.sum(lora.lora_delta(x, a, b, scale).astype(jnp.float32) * c)

  y = jax.jit(lambda x, a, b: lora.lora_delta(x, a, b, scale))(cast(x), cast(a), cast(b))
  dx, da, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(cast(x), cast(a), cast(b))
  x2, c2 = x.reshape(-1, 12), c.reshape(-1, 9)
  ref_y = scale * x @ a @ b
  ref_dx = (scale * c2 @ b.T @ a.T).reshape(x.shape)
  ref_da = scale * x2.T @ (c2 @ b.T)
  ref_db = scale * (x2 @ a).T @ c2
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for got, ref in ((y, ref_y), (dx, ref_dx), (da, ref_da), (db, ref_db)):
    assert got.dtype == dtype and got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), ref,
                               atol=tol * np.abs(ref).max(), rtol=0)
