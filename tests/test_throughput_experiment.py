"""experiments/throughput.py: speedup arithmetic and a tiny end-to-end run (MFU: test_measure)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import throughput as tp
from lost_jax import configs
from lost_jax.training import accounting
from lost_jax.ops import matmul as matmul_lib

TINY = {"model.vocab_size": 128, "model.d_model": 32, "model.ffn_dim": 64,
        "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
        "model.linear.rank": 4}


def test_speedup_predicted_realised_fraction():
  ref = {"train_flops_per_token": 300.0, "tokens_per_s": 100.0}
  row = {"train_flops_per_token": 200.0, "tokens_per_s": 120.0}
  s = tp.speedup(ref, row)
  assert s["predicted"] == pytest.approx(1.5)      # 300 / 200 FLOPs
  assert s["realised"] == pytest.approx(1.2)       # 120 / 100 tokens/s
  assert s["fraction"] == pytest.approx(0.8)
  assert tp.speedup(ref, ref) == {"predicted": 1.0, "realised": 1.0, "fraction": 1.0}


def test_logits_share_is_head_over_forward_flops():
  model = configs.pretrain_config("llama_60m", "full_rank").model
  d, v, n_layers, f = 512, 32000, 8, 1376
  proj = 4 * 2 * d * d + 3 * 2 * d * f
  attn = 2 * 2 * 256 * d
  expected = 2 * d * v / (n_layers * (proj + attn) + 2 * d * v)
  assert tp.logits_share(model, 256) == pytest.approx(expected)
  lost = configs.pretrain_config("llama_60m", "lost").model
  assert tp.logits_share(lost, 256) > tp.logits_share(model, 256)


def test_targets_mfu_in_float32_and_lost_speedup_in_every_precision():
  rows = [dict(precision="float32", method="full_rank", mfu=0.8,
               speedup={"fraction": 1.0}),
          dict(precision="mixed", method="full_rank", mfu=0.1, speedup={"fraction": 1.0}),
          dict(precision="float32", method="lost", mfu=0.5, speedup={"fraction": 0.7}),
          dict(precision="mixed", method="lost", mfu=0.1, speedup={"fraction": 0.9})]
  out = tp.targets({"rows": rows})
  assert [(v, target, met) for _, v, target, met in out] == [
      (0.8, 0.8, True), (0.7, 0.9, False), (0.9, 0.9, True)]
  assert ["mixed" in desc for desc, *_ in out] == [False, False, True]


def test_bench_config_matches_ranks_and_sets_the_step():
  cfg = tp.bench_config("llama_60m", "cola", "float32", 8, 256)
  assert (cfg.train.batch_size, cfg.train.microbatches, cfg.data.seq_len,
          cfg.train.precision) == (8, 1, 256, "float32")
  lost = configs.pretrain_config("llama_60m", "lost").model.linear
  assert cfg.model.linear.rank == configs.matched_rank(cfg.model, "cola", lost.rank,
                                                       lost.sparsity, lost.density)


@pytest.mark.parametrize("n,m", [(24, 16), (16, 24)])   # transposes g, resp. x, on CPU
def test_mixed_matmul_gradients_are_float32_accumulated_and_close_to_float32(n, m):
  """matmul_lib.matmul in bf16: f32 weight gradient, all three products close to float32's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, n)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((n, m)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((2, 5, m)), jnp.float32)

  def loss(x, w, dtype):
    return jnp.sum(matmul_lib.matmul(x, w, dtype).astype(jnp.float32) * c)

  y16 = matmul_lib.matmul(x, w, jnp.bfloat16)
  assert y16.dtype == jnp.bfloat16
  g16 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.bfloat16)
  g32 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.float32)
  assert g16[1].dtype == jnp.float32 and g16[0].dtype == jnp.float32
  # float64 references: dx = c @ w.T, dw = x^T c (bf16 operands: ~2^-8 relative error).
  x2, c2 = np.asarray(x, np.float64).reshape(-1, n), np.asarray(c, np.float64).reshape(-1, m)
  dw_ref, dx_ref = x2.T @ c2, (c2 @ np.asarray(w, np.float64).T).reshape(2, 5, n)
  for got32, got16, ref in ((g32[1], g16[1], dw_ref), (g32[0], g16[0], dx_ref)):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(got32), ref, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(got16), ref, atol=2e-2 * scale)
    assert np.abs(np.asarray(got16) - ref).max() > 1e-6 * scale   # really rounded to bf16


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
  fake_torch = lambda n: [0.5] * n    # a stand-in for torch_baseline.make_runner(cfg)
  result = tp.run("quickstart", ("full_rank", "lost"), ("float32",), batch=2, seq_len=16,
                  rounds=2, steps_per_round=1, warmup=0, peak_sizes=(64,), overrides=TINY,
                  extra_runners={("float32", "torch_lost"): fake_torch}, log=lambda _: None)
  rows = {r["method"]: r for r in result["rows"]}
  assert rows.pop("torch_lost")["step_times_s"] == [0.5, 0.5]
  assert set(rows) == {"full_rank", "lost"} and result["peaks"]["float32"] > 0
  for method, r in rows.items():
    assert len(r["step_times_s"]) == 2
    cfg = tp.bench_config("quickstart", method, "float32", 2, 16, TINY)
    assert r["train_flops_per_token"] == accounting.train_flops_per_token(cfg.model, 16)
    assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"])
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / result["peaks"]["float32"])
  ref, lost = rows["full_rank"], rows["lost"]
  assert ref["speedup"]["realised"] == pytest.approx(1.0)
  assert lost["speedup"]["predicted"] == pytest.approx(
      ref["train_flops_per_token"] / lost["train_flops_per_token"])
  assert lost["speedup"]["realised"] == pytest.approx(lost["tokens_per_s"] / ref["tokens_per_s"])
  text = tp.report(result, "python experiments/throughput.py ...")
  assert "| float32 | lost | lost (4) |" in text
  assert "LOST float32 realised / FLOP-predicted speedup" in text
  assert "| float32 | lost | " in text.split("lost_jax vs PyTorch")[1]
  assert "lost_jax lost float32 at least as fast as PyTorch" in text
  # Files, and a re-render from the saved JSON alone gives the same report.
  result.update(command="python -m experiments.throughput --tiny", notes="a note")
  md, js, png = (str(tmp_path / n) for n in ("t.md", "t.json", "plots/t.png"))
  text = tp.write_outputs(result, md, js, png)
  assert os.path.getsize(png) > 0 and "![tokens/s per method and precision](plots/t.png)" in text
  assert "```\npython -m experiments.throughput --tiny\n```" in text and "a note" in text
  with open(js) as fh:
    again = tp.write_outputs(json.load(fh), str(tmp_path / "again.md"), out_png=png)
  assert again == text


def test_versus_torch_pairs_rows_by_precision_and_method():
  rows = [dict(precision="float32", method="full_rank", step_s=2.0),
          dict(precision="float32", method="torch_full_rank", step_s=3.0),
          dict(precision="mixed", method="lost", step_s=1.0),
          dict(precision="mixed", method="torch_lost", step_s=0.8),
          dict(precision="mixed", method="torch_full_rank", step_s=1.1)]  # no JAX row: skipped
  got = tp.versus_torch({"rows": rows})
  assert got == [("float32", "full_rank", 2.0, 3.0, 1.5), ("mixed", "lost", 1.0, 0.8, 0.8)]
