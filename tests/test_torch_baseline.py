"""experiments/torch_baseline.py: the LOST layer's formula and a tiny train step per method."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments import throughput, torch_baseline  # pylint: disable=wrong-import-position

TINY = {"model.vocab_size": 64, "model.d_model": 32, "model.ffn_dim": 48,
        "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
        "model.linear.rank": 4}


def test_lost_linear_matches_numpy():
  torch.manual_seed(0)
  lin = torch_baseline.LOSTLinear(10, 6, rank=3, keep=2, gamma=0.7)
  x = torch.randn(2, 5, 10)
  a, b, s = (p.detach().numpy().astype(np.float64) for p in (lin.a, lin.b, lin.values))
  idx = lin.idx.numpy()
  xn = x.numpy().astype(np.float64)
  z = xn @ a
  ref = 0.7 * (z / (1 + np.exp(-z))) @ b.T + 0.3 * xn[..., idx] @ s
  np.testing.assert_allclose(lin(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
  assert len(set(idx.tolist())) == 2


@pytest.mark.parametrize("method", ["full_rank", "lost"])
def test_tiny_train_step_runs_and_lowers_the_loss(method):
  cfg = throughput.bench_config("quickstart", method, "float32", 2, 8, TINY)
  cfg.train.lr = 1e-2
  run = torch_baseline.make_runner(cfg, compile_model=False)
  first = run.loss
  times = run(15)
  assert len(times) == 15 and all(t > 0 for t in times)
  assert math.isfinite(run.loss) and run.loss < first
  if method == "lost":
    block = torch_baseline.Llama(cfg.model).layers[0]
    keep = math.ceil(cfg.model.linear.sparsity * 32 - 1e-9)
    assert isinstance(block.q, torch_baseline.LOSTLinear) and block.q.values.shape == (keep, 32)


@pytest.mark.parametrize("method", ["full_rank", "lost"])
@pytest.mark.slow
def test_same_weights_and_tokens_give_lost_jax_losses(method):
  # The baseline computes what lost_jax computes: from lost_jax's initial parameters and the
  # same tokens, the losses of three train steps (forward, backward, clipping, AdamW under the
  # warmup schedule) agree in float32.
  import jax  # pylint: disable=g-import-not-at-top
  from lost_jax.recipes import pretrain  # pylint: disable=g-import-not-at-top
  from lost_jax.training import steps  # pylint: disable=g-import-not-at-top
  from lost_jax.training import state as train_state  # pylint: disable=g-import-not-at-top
  from lost_jax.training import runtime  # pylint: disable=g-import-not-at-top
  cfg = throughput.bench_config("quickstart", method, "float32", 2, 8, TINY)
  cfg.train.update(lr=1e-2, steps=20, warmup_frac=0.1, weight_decay=0.1,
                   decay_norms_and_embeddings=False, clip_norm=0.5)
  cfg, mesh = runtime.start(cfg, "pretrain")
  setup = pretrain.make_setup(cfg, mesh)
  state, rest = setup.init(jax.random.key(0))
  flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path((state["params"], rest))}
  flat = {k.split("/", 1)[1]: v for k, v in flat.items()}   # drop the tuple index
  batch = throughput.synthetic_batch(2, 8, cfg.model.vocab_size)
  step = steps.make_train_step(setup, 1)
  ours = []
  for _ in range(3):
    state, out = step(state, rest, train_state.to_global(batch, mesh))
    ours.append(float(out["loss"]))
  run = torch_baseline.make_runner(cfg, params=flat, compile_model=False)
  np.testing.assert_array_equal(run.inputs.numpy(), batch["inputs"])
  theirs = [run.loss] + [run(1) and run.loss for _ in range(2)]
  assert ours[2] < ours[0] - 1e-3          # the updates moved the loss
  np.testing.assert_allclose(theirs, ours, rtol=2e-5)
