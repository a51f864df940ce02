"""losses.fused_cross_entropy against a NumPy derivation of weighted CE and its gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_pretrain_config
from lost_jax.ops import losses
from lost_jax.training import optim
from lost_jax.recipes import lm


def numpy_ce(h, w, targets, weights):
  """float64: NLL sum, weight sum and the gradients of the NLL sum for h, w and weights."""
  h, w, weights = (np.asarray(a, np.float64) for a in (h, w, weights))
  logits = h @ w                                                   # [B, L, V]
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  p = np.exp(logits - lse[..., None])
  onehot = np.arange(w.shape[1]) == targets[..., None]
  dlogits = (p - onehot) * weights[..., None]
  dh = dlogits @ w.T
  dw = np.einsum("bld,blv->dv", h, dlogits)
  return (nll * weights).sum(), weights.sum(), dh, dw, nll


def _inputs(b=2, length=11, d=8, v=37, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, length, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
  targets = rng.integers(0, v, (b, length)).astype(np.int32)
  weights = rng.uniform(0.5, 2.0, (b, length)).astype(np.float32)
  weights[0, -3:] = 0.0          # masked positions inside the last (partial) chunk
  weights[1, :2] = 0.0
  return (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(targets),
          jnp.asarray(weights))


def _fused_and_grads(h, w, targets, weights, **kw):
  def f(h, w, weights):
    nll, wsum = losses.fused_cross_entropy(h, w, targets, weights, **kw)
    return nll, wsum
  (nll, wsum), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(h, w, weights)
  return nll, wsum, grads


@pytest.mark.parametrize("chunk,vocab_chunk,backward", [
    (4, 0, "xla"),             # 11 positions: chunks of 4, 4 and a padded 3
    (4, 8, "cpu_transposed"),  # vocab 37 in slices of 8 (+ a slice of 5): online lse
    (11, 37, "xla"),           # one chunk, one slice
    (64, 0, "xla"),            # chunk longer than the sequence
])
@pytest.mark.slow
def test_float32_matches_numpy(chunk, vocab_chunk, backward):
  h, w, targets, weights = _inputs()
  nll, wsum, (dh, dw, dweights) = _fused_and_grads(h, w, targets, weights, chunk=chunk,
                                                   vocab_chunk=vocab_chunk, backward=backward)
  ref_nll, ref_wsum, ref_dh, ref_dw, ref_tok = numpy_ce(h, w, np.asarray(targets), weights)
  np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-5)
  np.testing.assert_allclose(float(wsum), ref_wsum, rtol=1e-6)
  np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dweights, ref_tok, rtol=1e-5)   # d(sum nll w)/dw = nll
  # Masked tokens get no gradient; the last positions (the padded chunk's) do.
  assert np.all(np.asarray(dh)[0, -3:] == 0) and np.all(np.asarray(dh)[1, :2] == 0)
  assert np.abs(np.asarray(dh)[1, -1]).max() > 1e-3


def test_the_partial_chunk_and_the_weights_count():
  # Against the plain loss: dropping the remainder positions or the weights changes the sum
  # by far more than the tolerance.
  h, w, targets, weights = _inputs(length=10)
  nll, _ = losses.fused_cross_entropy(h, w, targets, weights, chunk=3)
  plain, _ = optim.cross_entropy(h @ w, targets, weights)
  without_tail, _ = optim.cross_entropy(h[:, :9] @ w, targets[:, :9], weights[:, :9])
  unweighted, _ = optim.cross_entropy(h @ w, targets, jnp.ones_like(weights))
  np.testing.assert_allclose(float(nll), float(plain), rtol=1e-5)
  assert abs(float(plain) - float(without_tail)) > 1e-2 * abs(float(plain))
  assert abs(float(plain) - float(unweighted)) > 1e-2 * abs(float(plain))


def test_tied_head_gradient_reaches_the_embedding():
  # Tied: logits = (h0 + E[x]) @ E^T, so E gets the head's gradient (transposed) and the
  # lookup's scattered input gradient.
  h0, w, targets, weights = _inputs(seed=1)
  emb = w.T                                                      # [V, D]
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, emb.shape[0], targets.shape))

  def loss(e):
    return losses.fused_cross_entropy(h0 + e[tokens], e.T, targets, weights, chunk=4,
                                      vocab_chunk=16)[0]
  de = jax.grad(loss)(emb)
  h = np.asarray(h0 + emb[tokens], np.float64)
  _, _, ref_dh, ref_dw, _ = numpy_ce(h, np.asarray(emb).T, np.asarray(targets), weights)
  ref = ref_dw.T.copy()
  np.add.at(ref, np.asarray(tokens).reshape(-1), ref_dh.reshape(-1, ref_dh.shape[-1]))
  np.testing.assert_allclose(de, ref, rtol=1e-5, atol=1e-6)


def test_frozen_head_gives_the_same_input_gradient_under_jit():
  # Fine-tuning differentiates h only (the head is frozen): that path skips the head's
  # gradient and must give the same dh.
  h, w, targets, weights = _inputs(seed=3)
  grad_h = jax.jit(jax.grad(lambda h: losses.fused_cross_entropy(
      h, w, targets, weights, chunk=4, backward="cpu_transposed")[0] / 7.0))
  _, _, ref_dh, _, _ = numpy_ce(h, w, np.asarray(targets), weights)
  np.testing.assert_allclose(grad_h(h), ref_dh / 7.0, rtol=1e-5, atol=1e-7)


def test_bfloat16_operands_within_bf16_tolerance():
  # bf16 h and head, float32 accumulation and log-sum-exp: the loss matches float64 math on
  # the same bf16 values closely; gradients carry bf16 rounding of the logits' cotangent.
  h, w, targets, weights = _inputs(length=13, d=16, v=300, dtype=jnp.bfloat16)
  nll, _, (dh, dw, _) = _fused_and_grads(h, w, targets, weights, chunk=5, vocab_chunk=128,
                                         dtype=jnp.bfloat16, backward="cpu_transposed")
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  ref_nll, _, ref_dh, ref_dw, _ = numpy_ce(np.asarray(h, np.float32), np.asarray(w, np.float32),
                                           np.asarray(targets), weights)
  np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-5)
  for got, ref in ((dh, ref_dh), (dw, ref_dw)):
    got = np.asarray(got, np.float64)
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max(), np.abs(got - ref).max()


def test_refuses_bad_chunks():
  h, w, targets, weights = _inputs()
  with pytest.raises(ValueError, match="loss_chunk"):
    losses.fused_cross_entropy(h, w, targets, weights, chunk=0)


def _tiny_cfg(precision: str, loss_chunk: int) -> ml_collections.ConfigDict:
  cfg = tiny_pretrain_config("lost", rank=4, seq_len=128, precision=precision,
                             model=dict(vocab_size=96, d_model=32, ffn_dim=48, n_layers=1,
                                        n_heads=2))
  cfg.model.perf.loss_chunk = loss_chunk
  cfg.model.perf.loss_vocab_chunk = 40 if loss_chunk else 0
  return cfg


@pytest.mark.parametrize("precision,rtol", [("float32", 1e-5), ("mixed", 2e-2)])
@pytest.mark.slow
def test_train_loss_and_grads_equal_the_plain_loss(precision, rtol):
  from lost_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 96, (2, 10)).astype(np.int32)
  batch = dict(inputs=tokens, targets=np.roll(tokens, -1, 1),
               positions=np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10)),
               segment_ids=np.ones((2, 10), np.int32),
               weights=(rng.uniform(size=(2, 10)) > 0.3).astype(np.float32))
  out = {}
  for chunk in (0, 3):
    graphdef, params, rest = nnx.split(Llama(_tiny_cfg(precision, chunk).model,
                                             rngs=nnx.Rngs(0)), nnx.Param, ...)
    # One compiled loss and gradient, not op-by-op dispatch of the model (the same math).
    (nll, weight), grads = jax.jit(jax.value_and_grad(
        lambda p: lm.next_token_nll(nnx.merge(graphdef, p, rest), batch), has_aux=True))(params)
    out[chunk] = (float(nll), float(weight), jax.tree.leaves(nnx.as_pure(grads)))
  (nll0, w0, g0), (nll3, w3, g3) = out[0], out[3]
  assert w0 == w3 == batch["weights"].sum()
  np.testing.assert_allclose(nll3, nll0, rtol=1e-5 if precision == "float32" else 1e-3)
  for a, b in zip(g0, g3):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= rtol * max(np.abs(a).max(), 1e-12)
