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
