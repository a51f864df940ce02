"""KV-cache decoding equals re-running the full forward on the growing sequence; rows stop at
their first stop token; temperature / top-p sampling follows its distribution and its seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lost_jax import Llama, configs
from lost_jax.models import generate
from lost_jax.models.generate import greedy_generate


@pytest.mark.parametrize("kind", ["dense", "lost"])
@pytest.mark.slow
def test_cached_greedy_decoding_matches_uncached(kind):
  cfg = configs.model_config("quickstart")
  cfg.update(dict(dtype="float32", vocab_size=64, n_layers=2, n_kv_heads=2))
  cfg.linear.kind, cfg.linear.rank = kind, 16
  cfg.remat = kind == "lost"      # a remat (training) config decodes too
  model = Llama(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  mask = np.ones((3, 7), np.int32)
  mask[0, :3] = 0   # left padding of different lengths
  mask[1, :1] = 0
  prompts = rng.integers(1, 64, (3, 7)).astype(np.int32) * mask
  out = np.asarray(greedy_generate(model, jnp.asarray(prompts), jnp.asarray(mask),
                                   max_new_tokens=5))
  assert out.shape == (3, 5)
  for r in range(3):
    assert_greedy(model, prompts[r][mask[r].astype(bool)].tolist(), out[r].tolist())


def tiny_model():
  cfg = configs.model_config("quickstart")
  cfg.update(dict(dtype="float32", vocab_size=64, n_layers=2, n_kv_heads=2))
  return Llama(cfg, rngs=nnx.Rngs(0))


def assert_greedy(model, prompt, continuation):
  """`continuation` is what greedy decoding without a cache gives: the model is causal, so one
  full forward over prompt + continuation holds every step's logits, and each token must be
  the argmax at the position before it."""
  # One compiled forward, not op-by-op dispatch of the whole model (the same logits).
  logits = np.asarray(nnx.jit(lambda m, ids: m(ids))(
      model, jnp.asarray([prompt + continuation], jnp.int32)))[0]
  n = len(prompt)
  assert np.argmax(logits[n - 1:-1], axis=-1).tolist() == continuation


@pytest.mark.slow
def test_each_row_stops_at_its_first_stop_token():
  model = tiny_model()
  prompts = np.array([[0, 5, 9, 11], [7, 3, 2, 8]], np.int32)
  mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
  free = np.asarray(generate.greedy_generate(model, jnp.asarray(prompts), jnp.asarray(mask), 6
                                             )).tolist()
  for p, m, cont in zip(prompts, mask, free):
    assert_greedy(model, p[m.astype(bool)].tolist(), cont)
  # Stop row 0 at its third token (a token it would emit); row 1 at whatever comes first of
  # those, or never: each row's output is its free continuation up to and including the
  # first stop token, then pad_id.
  stop = (free[0][2],)
  out = np.asarray(generate.greedy_generate(model, jnp.asarray(prompts), jnp.asarray(mask), 6,
                                            stop_ids=stop, pad_id=63))
  for row, want in zip(out.tolist(), free):
    cut = next((k + 1 for k, t in enumerate(want) if t in stop), len(want))
    assert row == want[:cut] + [63] * (6 - cut)
  assert out[0, 2] == stop[0] and (out[0, 3:] == 63).all()


def test_top_p_logits_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 11)).astype(np.float32) * 2
  for top_p in (0.05, 0.5, 0.9, 1.0):
    got = np.asarray(generate.top_p_logits(jnp.asarray(logits), top_p))
    for row, out in zip(logits, got):
      order = np.argsort(-row)
      probs = np.exp(row[order] - row.max()) / np.exp(row - row.max()).sum()
      # keep the most likely tokens until their mass reaches top_p
      n = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1 else len(row)
      keep = set(order[:min(n, len(row))].tolist())
      assert {i for i in range(len(row)) if np.isfinite(out[i])} == keep
      assert np.all(out[list(keep)] == row[list(keep)])


def test_sampling_follows_the_tempered_nucleus_distribution():
  logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0, -3.0]])
  temperature, top_p = 0.7, 0.9
  # 10000 rows of the same logits: 10000 independent draws
  draws = np.asarray(generate.next_token(jnp.tile(logits, (10000, 1)), jax.random.key(3),
                                         temperature, top_p))
  freq = np.bincount(draws.ravel(), minlength=5) / draws.size
  z = np.asarray(logits[0]) / temperature
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  keep = np.cumsum(p) - p < top_p          # sorted already: the first three tokens
  want = np.where(keep, p, 0) / p[keep].sum()
  np.testing.assert_allclose(freq, want, atol=0.015)   # 3 standard errors
  assert int(generate.next_token(logits, jax.random.key(3), 0.0, top_p)[0]) == 0   # greedy


@pytest.mark.slow
def test_sampled_decoding_is_seeded_and_a_tiny_nucleus_is_greedy():
  model = tiny_model()
  prompts = jnp.asarray(np.arange(1, 13, dtype=np.int32).reshape(2, 6))
  mask = jnp.ones((2, 6), jnp.int32)
  run = lambda seed, **kw: np.asarray(generate.generate(
      model, prompts, mask, 8, key=jax.random.key(seed), **kw))
  hot = dict(temperature=5.0, top_p=1.0)
  assert (run(1, **hot) == run(1, **hot)).all() and (run(1, **hot) != run(2, **hot)).any()
  greedy = np.asarray(generate.greedy_generate(model, prompts, mask, 8))
  assert (run(4, temperature=1.0, top_p=1e-6) == greedy).all()
