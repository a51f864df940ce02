"""SparseLoRA plan calibration: the plan choice against brute force, the per-layer probes against
the normal SparseLoRA forward, budgets, resume, and the plan file in `finetune`."""

import itertools
import json
import os
import shutil

import jax
import numpy as np
import pytest

import helpers
from lost_jax import configs
from lost_jax.adapters.sparselora import calibrate as sl_cal
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora.model import SparseLoRALlama
from lost_jax.errors import UserError
from lost_jax.recipes import calibrate, finetune
from lost_jax.recipes.lm import next_token_nll
from lost_jax.training import runtime


def test_format_layer_sparsity_round_trips():
  for values in [(0.0, 0.9, 0.9, 0.5, 0.0, 0.5), (0.0,) * 3, (0.99,) * 4, (0.5, 0.0, 0.5)]:
    spec = configs.format_layer_sparsity(values)
    assert configs.parse_layer_sparsity(spec, len(values), "x") == values
  assert configs.format_layer_sparsity((0.0, 0.9, 0.9, 0.5)) == "0.9@1-2;0.5@3"


def _brute_force(groups, budget, unit):
  """Most FLOPs saved over every combination of options (None: dense) within the budget."""
  keys = sorted(groups)
  best = (0.0, {})
  for combo in itertools.product(*[[None] + list(groups[k]) for k in keys]):
    taken = {k: o for k, o in zip(keys, combo) if o is not None and o.saving > 0}
    cost = sum(max(1, int(np.ceil(max(o.increase, 0) / unit - 1e-9))) for o in taken.values())
    saved = sum(o.saving for o in taken.values())
    if cost * unit <= budget + 1e-12 and saved > best[0] + 1e-9:
      best = (saved, {k: o.sparsity for k, o in taken.items()})
  return best


def test_choose_plan_is_the_best_plan_within_budget():
  rng = np.random.default_rng(0)
  unit = 1e-3
  for trial in range(30):
    groups = {(p, i): [sl_cal.Option(s, float(rng.normal(0.01, 0.01)) * (1 + 3 * s),
                                     float(rng.uniform(-1, 10)) * s)
                       for s in (0.5, 0.9)] for p in ("ffn", "attn") for i in range(3)}
    previous = -1.0
    for budget in (0.0, 0.005, 0.02, 0.05, 0.2):
      choice = sl_cal.choose_plan(groups, budget, unit)
      saved = sum(next(o.saving for o in groups[k] if o.sparsity == s) for k, s in choice.items())
      want, _ = _brute_force(groups, budget, unit)
      assert saved == pytest.approx(want, abs=1e-9), (trial, budget)
      assert saved >= previous - 1e-9                     # a larger budget never saves less
      previous = saved
      if budget == 0.0:
        assert choice == {}


def test_fit_plan_finds_the_largest_additive_budget_whose_measured_plan_fits():
  # 40 parts, each harmless alone (+0.01%, some "free": -0.02%), whose measured cost grows
  # as the square of their count: the additive model's plan at 2% costs 16%.
  unit = 1e-5
  groups = {("ffn", i): [sl_cal.Option(0.9, -2e-4 if i % 3 == 0 else 1e-4, 1.0 + i)]
            for i in range(40)}
  calls = []

  def measure(choice):
    calls.append(len(choice))
    return 1e-4 * len(choice) ** 2
  choice, inc, tried = sl_cal.fit_plan(groups, 0.02, measure, unit)
  assert len(sl_cal.choose_plan(groups, 0.02, unit)) == 40
  assert inc <= 0.02 and inc == 1e-4 * len(choice) ** 2
  # maximal on the grid: the next larger plan choose_plan makes does not fit
  assert len(choice) == 14
  bigger = [c for c in range(int(0.02 / unit) + 1)
            if len(sl_cal.choose_plan(groups, c * unit, unit)) > len(choice)]
  assert 1e-4 * len(sl_cal.choose_plan(groups, bigger[0] * unit, unit)) ** 2 > 0.02
  # a plan is measured once, and the search takes far fewer measurements than parts
  assert len(calls) == len(tried) <= 12
  assert len({p for p, _, _ in tried}) == len(tried)     # each additive budget tried once
  assert [n for _, n, _ in tried] == calls and tried[0][:2] == (0.02, 40)
  # the measured plan of the whole budget fits: no search; a zero budget: dense, unmeasured
  calls.clear()
  assert sl_cal.fit_plan(groups, 0.5, measure, unit)[0] == sl_cal.choose_plan(groups, 0.5, unit)
  assert calls == [40]
  assert sl_cal.fit_plan(groups, 0.0, measure, unit) == ({}, 0.0, []) and calls == [40]
  # nothing fits (one part alone is over): the dense plan
  assert sl_cal.fit_plan(groups, 0.02, lambda c: 1.0, unit)[:2] == ({}, 0.0)


def _cfg(**sparse):
  cfg = helpers.tiny_finetune_config(steps=2)
  cfg.sparse.update({"calibration_batches": 1, "calibration_sparsities": "0.75", **sparse})
  return cfg


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("calibrate"))
  record = calibrate.calibrate(_cfg(), workdir, budget=0.02, quiet=True)
  return workdir, record


def test_calibrated_plan_is_within_budget_and_measured_right(calibrated):
  workdir, record = calibrated
  plan = sl_plan.SparsityPlan(record["ffn"], record["attn"])
  assert plan.estimator_layers(), record      # the tiny model has a plan that saves FLOPs
  assert record["increase"] <= 0.02 and record["flops_vs_lora"] < 1.0
  # Independently: the normal SparseLoRA forward (the fine-tune's module, plan and loss) on
  # the same batch gives the dense loss, each probe's loss and the plan's loss.
  cfg, mesh = runtime.start(_cfg(ffn="", attn=""), "finetune")
  module, _, run_cfg, tok = finetune.adapted_and_tokenizer(cfg, workdir, mesh,
                                                           all_estimators=True)
  (batch,), (lengths,) = finetune.calibration_inputs(run_cfg, tok)
  est = {k: {m: {w: a[...] for w, a in f.items()} for m, f in v.items()}
         for k, v in module.estimators.items()}

  def loss(p):
    s, w = next_token_nll(SparseLoRALlama(module.model, est, p), batch, lengths)
    return float(s / w)

  with open(os.path.join(workdir, calibrate.MEASUREMENTS), encoding="utf-8") as f:
    stored = json.load(f)["results"]
  dense = loss(sl_plan.SparsityPlan.dense(2))
  assert np.mean(stored["dense"][0][0] / stored["dense"][0][1]) == pytest.approx(dense, rel=1e-6)
  for part, s, layer in [("ffn", 0.75, 0), ("attn", 0.75, 1)]:
    k = {"ffn": 128, "attn": 32}[part]
    got = stored[f"{part} k={int(k * (1 - s) + 1e-6)} layer={layer}"][0]
    want = loss(sl_cal.part_plan(part, s, sl_plan.SparsityPlan.dense(2), layers=[layer]))
    assert got[0] / got[1] == pytest.approx(want, rel=1e-5), (part, s, layer)
    assert abs(want - dense) > 1e-4    # the probe is not the dense forward
    assert record["measured"][f"{part} {layer}"][f"{s:g}"] == pytest.approx(want / dense - 1,
                                                                            abs=1e-5)
  assert record["plan_loss"] == pytest.approx(loss(plan), rel=1e-5)
  assert record["dense_loss"] == pytest.approx(dense, rel=1e-6)


def test_budgets_resume_and_dense_at_zero(calibrated):
  workdir, record = calibrated
  path = os.path.join(workdir, calibrate.MEASUREMENTS)
  probes = {k for k in json.load(open(path, encoding="utf-8"))["results"]
            if not k.startswith("plan")}
  flops = []
  for budget in (0.0, 0.005, 0.02, 0.2):   # resumed: no probe is measured again
    r = calibrate.calibrate(_cfg(), workdir, budget=budget, quiet=True)
    assert r["increase"] <= budget
    flops.append(r["flops_per_step"])
    if budget == 0.0:
      assert r["ffn"] == [0.0, 0.0] and r["attn"] == [0.0, 0.0]
      assert r["flops_vs_lora"] == 1.0
    if budget == 0.02:
      assert (r["ffn"], r["attn"]) == (record["ffn"], record["attn"])
  assert flops == sorted(flops, reverse=True) and flops[-1] < flops[0]
  after = {k for k in json.load(open(path, encoding="utf-8"))["results"]
           if not k.startswith("plan")}
  assert after == probes
  with pytest.raises(UserError, match="other settings.*Fix:"):
    calibrate.calibrate(_cfg(calibration_batches=2), workdir, quiet=True)


@pytest.mark.slow   # a 2-step fine-tune with the plan, a refused resume, a refused depth
def test_plan_file_into_finetune_and_refusals(calibrated, tmp_path):
  workdir, record = calibrated
  plan_path = os.path.join(workdir, calibrate.PLAN_FILE)
  cfg = _cfg(plan=plan_path)
  out = finetune.finetune_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  assert np.isfinite(out["eval_loss"])
  with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
    sparse = json.load(f)["sparse"]
  assert (sparse["ffn"], sparse["attn"]) == (configs.format_layer_sparsity(record["ffn"]),
                                             configs.format_layer_sparsity(record["attn"]))
  # A resume with another plan is refused by the run's fingerprint, in one line.
  other = dict(record, ffn=[0.5, 0.5])
  other_path = str(tmp_path / "other.json")
  with open(other_path, "w", encoding="utf-8") as f:
    json.dump(other, f)
  cfg = _cfg(plan=other_path)
  cfg.train.steps = 4
  with pytest.raises(UserError, match="sparse") as e:
    finetune.finetune_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  assert "\n" not in str(e.value) and "Fix:" in str(e.value)
  # A plan for another depth is refused in one line, before any step.
  cfg = _cfg(plan=plan_path)
  cfg.model.n_layers = 3
  with pytest.raises(UserError, match="n_layers 2 \\(the base: 3\\)") as e:
    finetune.finetune_and_evaluate(cfg, str(tmp_path / "deeper"), quiet=True)
  assert "\n" not in str(e.value) and "Fix: calibrate" in str(e.value)
  shutil.rmtree(tmp_path / "deeper", ignore_errors=True)


def test_asvd_estimators_fit_the_calibration_batches_and_are_cached(tmp_path, monkeypatch,
                                                                   capsys):
  from lost_jax.adapters.sparselora import estimator as sl_estimator
  cfg, mesh = runtime.start(_cfg(estimator="asvd", estimator_rank=4, ffn="0.75@0-1", attn="0.5@1"), "finetune")
  workdir = str(tmp_path)
  module, plan, run_cfg, tok = finetune.adapted_and_tokenizer(cfg, workdir, mesh)
  est = {k: {m: {w: a[...] for w, a in f.items()} for m, f in v.items()}
         for k, v in module.estimators.items()}
  # The factors are asvd's of the dense layer inputs on the calibration batches' context.
  batches, lengths = finetune.calibration_inputs(run_cfg, tok)
  masks = [sl_estimator.token_mask(b["segment_ids"], b["inputs"].shape[1] - n.dense_len,
                                   "context") for b, n in zip(batches, lengths)]
  assert all(0 < int(m.sum()) < int((b["segment_ids"] > 0).sum())
             for m, b in zip(masks, batches))              # context only, not every token
  moments = sl_estimator.input_moments(module.model, batches, masks, plan.estimator_layers())
  want = sl_estimator.build_estimators(module.model, 4, plan.estimator_layers(), kind="asvd",
                                       moments=moments)
  for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Cached with what they were fitted to, and reused as they are.
  monkeypatch.setattr(sl_estimator, "build_estimators", None)   # a rebuild would fail
  again, *_ = finetune.adapted_and_tokenizer(cfg, workdir, mesh)
  for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(again.estimators)):
    np.testing.assert_array_equal(a, b[...])
  # Other calibration data, or the svd estimator, in that workdir: rebuilt (one line says
  # why; a checkpoint of other settings is refused before, by its fingerprint).
  monkeypatch.undo()
  for sparse, why in ((dict(estimator="asvd", calibration_batches=2), "other calibration data"),
                      (dict(estimator="svd"), "asvd estimators, requested svd")):
    cfg2, _ = runtime.start(_cfg(estimator_rank=4, ffn="0.75@0-1", attn="0.5@1", **sparse),
                           "finetune")
    capsys.readouterr()
    finetune.adapted_and_tokenizer(cfg2, workdir, mesh)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert why in line and line.endswith("; rebuilding it from the base"), line


@pytest.mark.slow   # a 2-step SparseLoRA fine-tune with asvd estimators
def test_finetune_with_asvd_estimators(tmp_path):
  cfg = _cfg(estimator="asvd", ffn="0.75@0-1", attn="0.5@1")
  out = finetune.finetune_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert np.isfinite(out["eval_loss"])
  with np.load(tmp_path / "estimators.npz") as data:
    header = json.loads(str(data["__header__"]))
  assert header["estimator"] == "asvd" and header["rank"] == [8]
  assert header["calibration"]["batches"] == 1
