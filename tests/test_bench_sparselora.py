"""experiments/bench_sparselora.py and its report: a tiny timed run (FLOPs: test_measure)."""

import json

import numpy as np
import pytest

from experiments import bench_sparselora as bench
from experiments import bench_sparselora_report as bench_report
from lost_jax.adapters.sparselora import model as sl
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.errors import UserError


@pytest.mark.slow
def test_tiny_benchmark_runs_and_reports():
  cfg = bench.bench_model_config(n_layers=2, d_model=32, ffn_dim=64, n_heads=4, n_kv_heads=2,
                                 vocab_size=64)
  plan = sl_plan.SparsityPlan.from_layers(2, 0.75, "1", 0.5, "1")
  result = bench.run_benchmark(cfg, plan, seq_len=32, out_len=8, bucket=8, lora_rank=4,
                               lora_alpha=8.0, warmup=1, steps=2, log=lambda _: None)
  assert result["settings"]["dense_len"] == 8
  for name in ("lora", "sparselora", "estimator"):
    seconds = result["timings"][name].seconds
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
  assert all(np.isfinite(v) for v in result["losses"].values())
  metrics = bench_report.summary(result)
  assert metrics["flop_ratio"] > 1.0
  text = bench_report.report(result, cfg, "FFN 0.75 on 1, attention 0.5 on 1", "cmd --x")
  assert "```\ncmd --x\n```" in text and "Code version: commit" in text
  assert "| sparselora |" in text and "Wall-clock speedup" in text
  assert f"{metrics['flop_ratio']:.2f}x" in text
  # the record beside the page: what sparselora_accuracy matches a frontier plan by
  rec = json.loads(json.dumps(bench_report.record(result, cfg, plan, "p", "cmd",
                                                  {"sources": "x"})))
  assert rec["plan"] == {"ffn": [0.0, 0.75], "attn": [0.0, 0.5]}
  assert rec["code"] == {"sources": "x"}
  assert rec["shape"] == dict(n_layers=2, d_model=32, ffn_dim=64, n_heads=4, n_kv_heads=2,
                              vocab_size=64)
  t = result["timings"]
  assert rec["summary"]["speedup"] == pytest.approx(
      np.median(t["lora"].seconds) / np.median(t["sparselora"].seconds))
  assert rec["settings"]["batch"] == 1 and rec["settings"]["seq_len"] == 32


@pytest.mark.slow
def test_dense_path_and_logits_from_match_the_model():
  # The benchmark's dense LoRA runs sparselora.forward with an all-dense plan and the LM head
  # on the loss suffix only: it must equal the model's own logits on those positions.
  import jax  # pylint: disable=g-import-not-at-top
  cfg = bench.bench_model_config(n_layers=2, d_model=32, ffn_dim=64, n_heads=4, n_kv_heads=2,
                                 vocab_size=64)
  model = bench.build_lora_model(cfg, lora_rank=4, lora_alpha=8.0)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  full = np.asarray(model(tokens))
  dense = sl.forward(model, tokens, None, sl_plan.SparsityPlan.dense(2), 16, logits_from=12)
  np.testing.assert_allclose(np.asarray(dense), full[:, 12:], rtol=1e-5, atol=1e-5)
  plan = sl_plan.SparsityPlan.from_layers(2, 0.75, "1", 0.5, "1")
  est = bench.fast_estimators(model, plan.estimator_layers(), rank=2)
  whole = sl.forward(model, tokens, est, plan, 4)
  tail, idx = sl.forward(model, tokens, est, plan, 4, logits_from=12, return_indices=True)
  np.testing.assert_allclose(np.asarray(tail), np.asarray(whole)[:, 12:], rtol=1e-5,
                             atol=1e-5)
  # The sparse last layer runs its dense rows only past attention: no FFN channels chosen.
  assert idx[1]["attn"] is not None and idx[1]["ffn"] is None


def test_a_calibrated_plan_file_is_timed_as_written_and_refused_for_another_shape(tmp_path):
  cfg = bench.bench_model_config(n_layers=3, d_model=32, ffn_dim=64, n_heads=4, n_kv_heads=2,
                                 vocab_size=64)
  plan = sl_plan.SparsityPlan((0.5, 0.0, 0.9), (0.0, 0.75, 0.0))
  path = tmp_path / "plan.json"
  path.write_text(json.dumps(sl_plan.plan_record(plan, cfg, ffn_spec="0.5@0;0.9@2",
                                                 attn_spec="0.75@1")))
  got, text = bench.bench_plan(cfg, str(path), 0.99, "0-2", 0.0, "")
  assert (got.ffn, got.attn) == (plan.ffn, plan.attn)
  assert text == "the plan file plan.json (FFN `0.5@0;0.9@2`, attention `0.75@1`)"
  other = bench.bench_model_config(n_layers=2, d_model=32, ffn_dim=64, n_heads=4,
                                   n_kv_heads=2, vocab_size=64)
  with pytest.raises(UserError):
    bench.bench_plan(other, str(path), 0.0, "", 0.0, "")
  got, text = bench.bench_plan(cfg, "", 0.9, "1-2", 0.0, "")
  assert got.ffn == (0.0, 0.9, 0.9) and text == "FFN 0.9 on layers 1-2, attention dense"
