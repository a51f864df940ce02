"""experiments/bench_sparselora.py: FLOP count against a hand count, and a tiny timed run."""

import numpy as np

from experiments import bench_sparselora as bench
from lost_jax.adapters.sparselora import model as sl
from lost_jax.adapters.sparselora import plan as sl_plan


def test_step_flops_matches_hand_count():
  # d=8, FFN 16, 2 query heads / 1 kv head of dim 4, vocab 10, 2 layers; 4 tokens, the last
  # one dense; LoRA r=2; estimator rank 2; layer 1 at FFN 0.5 and attention 0.5.
  cfg = bench.bench_model_config(n_layers=2, d_model=8, ffn_dim=16, n_heads=2, n_kv_heads=1,
                                 vocab_size=10)
  plan = sl_plan.SparsityPlan((0.0, 0.5), (0.0, 0.5))
  kw = dict(batch=1, seq_len=4, dense_len=1, lora_rank=2, estimator_rank=2)
  dense = bench.step_flops(cfg, sl_plan.SparsityPlan.dense(2), **kw)
  sparse = bench.step_flops(cfg, plan, **kw)

  # Base kernels q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8: 576 MACs/token;
  # forward + input gradient = 4 FLOPs per MAC.
  dense_layer = 4 * 4 * 576
  # Sparse layer: 2 of 4 kv channels -> q/o keep 4 of 8 (2 query heads share the kv head),
  # k/v keep 2 of 4, FFN keeps 8 of 16: 4*8 + 2*8 + 2*8 + 4*8 + 8*8 + 8*8 + 8*8 = 288 MACs
  # per context token (3 of them), 576 on the dense token.
  sparse_layer = 4 * (1 * 576 + 3 * 288)
  lora = 2 * 6 * 4 * 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8))   # 3 matmul pairs, 2 layers
  attention = 2 * 3 * 2 * 2 * (2 * 4) * (4 * 5 // 2)                # 10 causal pairs
  head = 4 * 4 * 8 * 10
  est_ffn = 2 * 3 * 8 + 2 * (2 * 8 * 2 + 2 * 2 * 16)                # mean; x_bar P Q, twice
  est_attn = sum(2 * 3 * 8 * 2 + 2 * 3 * 2 * 2 + 2 * 2 * 2 * m + 2 * 2 * m for m in (8, 4, 4))
  assert dense == {"base": 2 * dense_layer, "lora": lora, "attention": attention,
                   "head": head, "estimator": 0,
                   "total": 2 * dense_layer + lora + attention + head}
  assert sparse["base"] == dense_layer + sparse_layer == 14976
  assert sparse["estimator"] == est_ffn + est_attn == 792
  assert sparse["total"] == 14976 + lora + attention + head + 792 == 24344

  # Logits on the last token only: past attention the last layer runs that token alone (o,
  # gate, up, down: 64 + 3 * 128 MACs, and o's LoRA), q/k/v on all 4 as before (128 MACs
  # dense, 64 restricted on the 3 context tokens of the sparse plan).
  kw["logits_len"] = 1
  dense_tail = bench.step_flops(cfg, sl_plan.SparsityPlan.dense(2), **kw)
  sparse_tail = bench.step_flops(cfg, plan, **kw)
  tail_layer = 4 * (4 * 128 + 1 * 448)
  assert dense_tail["base"] == dense_layer + tail_layer
  assert sparse_tail["base"] == dense_layer + 4 * (128 + 3 * 64 + 448)
  lora_o_saved = 2 * 3 * 2 * (4 - 1) * (8 + 8)          # last layer's o adapter on 3 fewer
  assert dense_tail["lora"] == sparse_tail["lora"] == lora - lora_o_saved
  assert dense_tail["head"] == head // 4


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
  metrics = bench.summary(result)
  assert metrics["flop_ratio"] > 1.0
  text = bench.report(result, cfg, "FFN 0.75 on 1, attention 0.5 on 1", "cmd --x")
  assert "`cmd --x`" in text and "| sparselora |" in text and "Wall-clock speedup" in text
  assert f"{metrics['flop_ratio']:.2f}x" in text


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
