"""KV-cache greedy decoding equals re-running the full forward on the growing sequence."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lost_jax import Llama, configs
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
    seq = [int(t) for t in prompts[r][mask[r].astype(bool)]]
    for _ in range(5):
      logits = model(jnp.asarray([seq], jnp.int32))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert seq[-5:] == out[r].tolist()
