"""experiments/sparselora_diagnose.py: its NumPy pieces against direct derivations, and its
per-layer check on a tiny model (it agrees with lost_jax, and it notices a wrong estimator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import sparselora_diagnose as dg
from lost_jax import configs
from lost_jax.training import optim
from lost_jax.adapters.sparselora import model as sl
from lost_jax.models.llama import Llama
from lost_jax.adapters.sparselora import select as sl_select
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora import estimator as sl_estimator


def rand(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape)


def test_svd_factors_are_the_best_rank_r_approximation():
  k = rand(12, 20, seed=1)
  p, q = dg.np_svd_factors(k, 3)
  u, s, vt = np.linalg.svd(k)
  np.testing.assert_allclose(p @ q, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-12)
  np.testing.assert_allclose(p.T @ p, np.diag(s[:3]), atol=1e-10)   # split evenly
  np.testing.assert_allclose(q @ q.T, np.diag(s[:3]), atol=1e-10)


def test_spec_scores_by_hand():
  x = rand(2, 5, 6, seed=2)
  valid = np.ones((2, 5), bool)
  valid[0, :2] = False                               # left padding is not averaged
  wg, wu = rand(6, 9, seed=3), rand(6, 9, seed=4)
  got = dg.spec_ffn_scores(x, valid, wg, wu, rank=2)
  want = np.zeros(9)
  for b in range(2):
    x_bar = x[b][valid[b]].mean(0)
    pg, qg = dg.np_svd_factors(wg, 2)
    pu, qu = dg.np_svd_factors(wu, 2)
    g, u = x_bar @ pg @ qg, x_bar @ pu @ qu
    want += (g / (1 + np.exp(-g)) * u) ** 2
  np.testing.assert_allclose(got, np.sqrt(want), rtol=1e-12)
  # The full-rank column norms are the oracle's; lost_jax's Gram-matrix norms agree.
  p, q = dg.np_svd_factors(wg, 2)
  np.testing.assert_allclose(
      dg.spec_column_norms(x, valid, wg, rank=2),
      sl_select.low_rank_column_norms(jnp.asarray(x, jnp.float32), jnp.asarray(valid),
                               jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)),
      rtol=1e-4)
  y = x[valid] @ wg
  np.testing.assert_allclose(dg.spec_column_norms(x, valid, wg),
                             [np.linalg.norm(y[:, c]) for c in range(9)], rtol=1e-12)


def test_output_errors_by_explicit_masking():
  x, valid = rand(2, 4, 6, seed=5), np.ones((2, 4), bool)
  wg, wu, wd = rand(6, 10, seed=6), rand(6, 10, seed=7), rand(10, 6, seed=8)
  act = dg.ffn_act(x, valid, wg, wu)
  idx = np.array([1, 4, 7])
  keep = np.zeros(10)
  keep[idx] = 1
  dense = act @ wd
  masked = act @ (wd * keep[:, None])                 # down's input rows off idx zeroed
  assert dg.ffn_error(act, wd, idx) == pytest.approx(
      np.linalg.norm(dense - masked) / np.linalg.norm(dense), rel=1e-12)
  assert dg.ffn_error(act, wd, np.arange(10)) == pytest.approx(0.0, abs=1e-12)
  # Channel j's contribution score is exactly the error of dropping it alone.
  scores = dg.contribution_scores(act, wd)
  for j in range(10):
    rest = np.delete(np.arange(10), j)
    assert scores[j] == pytest.approx(np.linalg.norm(dense - act[:, rest] @ wd[rest]),
                                      rel=1e-10)
  y = x.reshape(-1, 6) @ wg
  assert dg.column_error(x, valid, wg, idx) == pytest.approx(
      np.linalg.norm(y * (1 - keep)) / np.linalg.norm(y), rel=1e-12)
  assert dg.overlap(np.array([1, 2, 3, 4]), np.array([3, 4, 5, 6])) == 0.5
  np.testing.assert_array_equal(dg.np_top_k(np.array([0.1, 5, 3, -1, 4]), 3), [1, 2, 4])


def test_token_loss_matches_optim_cross_entropy():
  logits, targets = rand(2, 3, 7, seed=9), np.array([[1, 2, 3], [4, 5, 6]])
  weights = np.array([[0, 1, 1], [1, 0, 1]], np.float32)
  nll, w = optim.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                               jnp.asarray(weights))
  assert dg.token_loss(logits, targets, weights) == pytest.approx(float(nll / w), rel=1e-5)


def tiny_model():
  cfg = configs.model_config("quickstart")
  cfg.update(dict(vocab_size=50, d_model=32, ffn_dim=48, n_layers=3, n_heads=4, n_kv_heads=2,
                  dtype="float32"))
  return Llama(cfg, rngs=nnx.Rngs(0))


def tiny_batch(b=2, length=12):
  rng = np.random.default_rng(1)
  seg = np.ones((b, length), np.int32)
  seg[0, :3] = 0
  pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
  w = np.zeros((b, length), np.float32)
  w[:, -4:] = 1
  return {"inputs": rng.integers(0, 50, (b, length)).astype(np.int32), "positions": pos,
          "segment_ids": seg, "targets": rng.integers(0, 50, (b, length)).astype(np.int32),
          "weights": w}


@pytest.mark.slow
def test_recorded_inputs_drift_and_layer_table_on_a_tiny_model():
  model, batch = tiny_model(), tiny_batch()
  plan = sl_plan.SparsityPlan.from_layers(3, ffn=0.5, ffn_layers="1-2", attn=0.5, attn_layers="2")
  est = sl_estimator.build_estimators(model, 4, plan.estimator_layers())
  logits, recs = dg.record_inputs(model, batch)
  np.testing.assert_allclose(logits, model(jnp.asarray(batch["inputs"]),
                                           jnp.asarray(batch["positions"]),
                                           jnp.asarray(batch["segment_ids"])), atol=1e-5)
  blk = model.layers[0]                                # layer 0's MLP input, by hand
  h0 = np.asarray(blk.attn_norm(model.embed(jnp.asarray(batch["inputs"]), jnp.float32)))
  np.testing.assert_allclose(recs[0].attn_in, h0, atol=1e-5)
  # The sparse plan's loss is the loss of sparselora.forward's logits.
  losses = dg.plan_losses(model, est, batch, {"p": plan}, dense_len=4)
  want = sl.forward(model, jnp.asarray(batch["inputs"]), est, plan, 4,
                    jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
  assert losses["p"] == pytest.approx(dg.token_loss(np.asarray(want), batch["targets"],
                                                    batch["weights"]), rel=1e-6)
  # Before the first sparse layer nothing moves; the sparse layer's context does.
  d = dg.drift(model, est, plan, batch, recs, dense_len=4)
  assert d[0][1:] == (0.0, 0.0) and d[1][1:] == (0.0, 0.0) and d[2][1] > 1e-3
  rows = dg.layer_table(model, est, plan, batch, recs, n_sparse=8, rank=4)
  assert [r["layer"] for r in rows] == [1, 2]
  assert all(r["ffn_same_svd"] and r["ffn_same_oracle"] for r in rows)
  assert rows[1]["v_same_svd"] and rows[1]["v_same_oracle"]
  # An estimator of the wrong kernels (layer 1's factors used for layer 2) is caught.
  wrong = {**est, sl_estimator.layer_key(2): est[sl_estimator.layer_key(1)]}
  rows = dg.layer_table(model, wrong, plan, batch, recs, n_sparse=8, rank=4)
  assert not rows[1]["ffn_same_svd"] and rows[1]["ffn_same_oracle"]


# ------------------------------------------------------------------ the estimator comparison


def test_chance_overlap_is_the_mean_overlap_of_random_subsets():
  rng = np.random.default_rng(0)
  for k, n in [(3, 10), (153, 1536), (76, 192)]:
    fixed = rng.choice(n, k, replace=False)
    draws = [dg.overlap(rng.choice(n, k, replace=False), fixed) for _ in range(4000)]
    # hypergeometric: mean k/n, variance (k/n)(1-k/n)(n-k)/(n-1)/k per draw
    var = (k / n) * (1 - k / n) * (n - k) / (n - 1) / k
    assert abs(np.mean(draws) - dg.chance_overlap(k, n)) < 5 * np.sqrt(var / 4000), (k, n)
  assert dg.chance_overlap(1536, 1536) == 1.0


def test_numpy_estimators_match_lost_jax():
  kern = rand(24, 40, seed=1)
  x = rand(500, 24, seed=2) @ (rand(24, 24, seed=3) * np.geomspace(5, 0.1, 24)[:, None])
  moment = x.T @ x / len(x)
  for mom in (None, moment):
    p, q = dg.np_estimator(kern, 5, mom)
    if mom is None:
      lp, lq = sl_estimator.svd_estimator(jnp.asarray(kern, jnp.float32), 5)
    else:
      lp, lq = sl_estimator.asvd_estimator(jnp.asarray(kern, jnp.float32),
                                           jnp.asarray(moment, jnp.float32), 5)
    want = np.asarray(lp, np.float64) @ np.asarray(lq, np.float64)
    assert np.linalg.norm(p @ q - want) / np.linalg.norm(want) < 1e-3
  # The weighted fit predicts x K better on x's distribution than the plain SVD.
  err = {m is None: np.linalg.norm(x @ (kern - np.dot(*dg.np_estimator(kern, 5, m))))
         for m in (None, moment)}
  assert err[False] < err[True]
  # Second moment and token masks.
  xs = [rand(2, 5, 3, seed=4), rand(2, 5, 3, seed=5)]
  seg = np.ones((2, 5), np.int32)
  seg[1, :2] = 0
  masks = [dg.np_token_mask(seg, 3, t) for t in ("context", "all")]
  np.testing.assert_array_equal(masks[0], sl_estimator.token_mask(seg, 3, "context"))
  np.testing.assert_array_equal(masks[1], seg > 0)
  rows = np.concatenate([xs[0][masks[0]], xs[1][masks[1]]]).astype(np.float64)
  np.testing.assert_allclose(dg.np_second_moment(xs, masks),
                             sum(np.outer(r, r) for r in rows) / len(rows), rtol=1e-12)
  # Factor-form scores are the rank-r scores.
  x3, valid = rand(2, 4, 24, seed=6), np.ones((2, 4), bool)
  np.testing.assert_allclose(dg.spec_column_norms_pq(x3, valid, dg.np_svd_factors(kern, 5)),
                             dg.spec_column_norms(x3, valid, kern, rank=5), rtol=1e-10)
  # Rank-r factors are the first r of larger ones: what a build at rank r gives.
  for mom in (None, moment):
    np.testing.assert_allclose(np.dot(*dg.truncated(dg.np_estimator(kern, 9, mom), 4)),
                               np.dot(*dg.np_estimator(kern, 4, mom)), atol=1e-9)
  model = tiny_model()
  moments = {"layer_1": {"attn": jnp.asarray(np.eye(32)), "mlp": jnp.asarray(np.eye(32) * 2)}}
  for kind in ("svd", "asvd"):
    big = sl_estimator.build_estimators(model, 6, [1], kind=kind, moments=moments)
    small = sl_estimator.build_estimators(model, 3, [1], kind=kind, moments=moments)
    for a, b in zip(jax.tree.leaves(dg.truncated(big, 3)), jax.tree.leaves(small)):
      np.testing.assert_array_equal(a, b)
  assert dg.check_layers("ends", (3, 5, 9)) == [3, 9] and dg.check_layers("5", (3, 5)) == [5]


def test_layer_metrics_summary_and_statements_by_hand():
  rng = np.random.default_rng(7)
  act, down = rng.normal(size=(30, 10)), rng.normal(size=(10, 6))
  x, ctx = rng.normal(size=(2, 15, 8)), np.ones((2, 15), bool)
  wv, wk = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
  truth = {"act": act, "down": down, "attn_in": x, "ctx": ctx, "v": wv, "k": wk}
  got = {"ffn": np.array([0, 1, 2]), "v": np.array([1, 3]), "k": np.array([0, 3])}
  oracle = {"ffn": np.array([1, 2, 5]), "v": np.array([0, 1]), "k": np.array([0, 3])}
  row = dg.layer_metrics(got, oracle, truth, spec={"ffn": np.array([0, 1, 2]),
                                                   "v": np.array([0, 3])})
  keep = np.zeros(10)
  keep[[0, 1, 2]] = 1
  y = act @ down
  assert row["ffn_overlap"] == pytest.approx(2 / 3) and row["ffn_chance"] == 0.3
  assert row["ffn_lost"] == pytest.approx(np.linalg.norm(y - act @ (down * keep[:, None]))
                                          / np.linalg.norm(y), rel=1e-12)
  yv = x.reshape(-1, 8) @ wv
  assert row["v_lost"] == pytest.approx(np.linalg.norm(yv[:, [0, 2]]) / np.linalg.norm(yv))
  assert (row["v_overlap"], row["v_chance"], row["qk_overlap"]) == (0.5, 0.5, 1.0)
  assert (row["ffn_spec_agree"], row["v_spec_agree"]) == (1.0, 0.5)
  # Two layers, two settings and a random reference, averaged over two batches.
  def layer(o, lost, chance=0.1):
    return {"ffn_overlap": o, "ffn_chance": chance, "ffn_lost": lost, "ffn_spec_agree": 1.0}
  a = dg.mean_rows([{"1": layer(0.3, 0.5), "2": layer(0.2, 0.6)},
                    {"1": layer(0.5, 0.7), "2": layer(0.0, 0.8)}])
  assert a == {"1": layer(0.4, 0.6), "2": layer(0.1, 0.7)}
  rand_layers = {"1": layer(0.1, 0.9), "2": layer(0.1, 0.65)}
  good = {"1": layer(0.4, 0.5), "2": layer(0.3, 0.6)}
  sa = dg.summarize(a, 2.0, 1.5, rand_layers)
  assert sa["ffn"]["below_chance"] == [2] and sa["ffn"]["lost_not_below_random"] == [2]
  assert sa["ffn"]["overlap"] == pytest.approx(0.25) and sa["loss_vs_dense"] == 0.5
  assert sa["ffn"]["min_margin"] == pytest.approx(0.0)
  sg = dg.summarize(good, 1.8, 1.5, rand_layers)
  assert dg.beats_chance_everywhere(sg) and not dg.beats_chance_everywhere(sa)
  text = " ".join(dg.statements({"a": sa, "b": sg, "random": dg.summarize(rand_layers, 2.1,
                                                                           1.5)}, "a", "X"))
  assert "every sparse layer (" in text and ": b (1 of 2); measured on X." in text
  assert "own estimator" not in text   # no default named
  said = lambda default: dg.statements({"a": sa, "b": sg}, "a", "X", default)[0]
  assert said("b") == "The config's own estimator, b, beats chance in every sparse layer " \
                      "(overlap and output lost)."
  assert said("a").startswith("The config's own estimator, a, does not beat chance")
  assert "a: ffn layers [2] below chance; ffn layers [2] losing no less than random" in text
  assert "mean FFN overlap: b (0.350, chance 0.100; a: 0.250)" in text
  assert "lowest plan loss: b (1.8000; a: 2.0000)" in text
  assert "Better than a on every measure (higher mean FFN and v overlap, less FFN and v " \
         "output lost, lower plan loss): b." in text
  # Better everywhere means every measure: a higher loss alone (or a tie) spoils it.
  assert dg.better_everywhere(sg, sa) and not dg.better_everywhere(sa, sg)
  assert not dg.better_everywhere(sg, dict(sa, loss=1.8)) and not dg.better_everywhere(sg, sg)


@pytest.mark.slow   # every estimator setting on a tiny fine-tune config, then a resume
def test_compare_on_a_tiny_model_resumes_and_renders(tmp_path, monkeypatch):
  import types
  import helpers
  import test_pages
  from lost_jax.errors import UserError
  cfg = helpers.tiny_finetune_config(steps=2)
  cfg.sparse.update(dict(ffn="0.75@0-1", attn="0.5@1", calibration_batches=1,
                         estimator_rank=4))
  flags = types.SimpleNamespace(estimators="svd:4,asvd:4", estimator_tokens="context,all",
                                eval_batches=1, workdir=str(tmp_path / "wd"),
                                numpy_check_layers="all")
  record = dg.compare(cfg.copy_and_resolve_references(), flags)
  s = record["summaries"]
  assert record["default"] == "svd r4 context" and set(s) == {
      "svd r4 context", "svd r4 all", "asvd r4 context", "asvd r4 all", "oracle", "random"}
  for name in record["settings"]:   # lost_jax chose exactly the NumPy re-derivation's channels
    assert s[name]["ffn"]["min_spec_agree"] == 1.0 and s[name]["v"]["min_spec_agree"] == 1.0
  assert s["oracle"]["ffn"]["overlap"] == 1.0 and s["oracle"]["v"]["overlap"] == 1.0
  assert s["svd r4 context"]["flops_vs_lora"] < 1.0 and s["svd r4 all"]["flops_vs_lora"] is None
  assert record["layers"]["asvd r4 all"]["1"]["v_chance"] == 0.5
  # Resumed: nothing is measured again; other flags in that workdir are refused.
  monkeypatch.setattr(dg, "plan_losses", None)
  assert dg.compare(cfg.copy_and_resolve_references(), flags) == record
  with pytest.raises(UserError, match="other settings.*Fix:"):
    dg.compare(cfg.copy_and_resolve_references(),
               types.SimpleNamespace(**{**vars(flags), "estimators": "svd:4"}))
  page = dg.render(record, "python -m experiments.sparselora_diagnose --out=x")
  assert test_pages.problems(page) == [] and "| svd r4 context |" in page
  assert dg.reference_of(record) == "svd r4 context" and "(paper)" not in page
