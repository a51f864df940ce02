"""experiments/sparselora_accuracy.py: an interrupted fine-tune is never stored as a result."""

import json
import os
import subprocess
import sys

import pytest

from experiments import common, runs, sparselora_accuracy
from lost_jax import configs
from lost_jax.data import instruct
from lost_jax.recipes import finetune
from lost_jax.training import metrics
from lost_jax.errors import UserError


def test_a_finetune_stopped_by_a_signal_is_no_result(tmp_path, monkeypatch):
  # finetune_and_evaluate returns without evaluating when SIGTERM saved a checkpoint at 56.
  monkeypatch.setattr(sparselora_accuracy.finetune, "finetune_and_evaluate",
                      lambda cfg, workdir, quiet: {})
  monkeypatch.setattr(sparselora_accuracy.metrics, "read_metrics",
                      lambda workdir: [{"step": 50, "loss": 0.2}, {"step": 56, "loss": 0.1}])
  cfg = configs.finetune_config("quickstart")
  with pytest.raises(runs.Interrupted, match=f"stopped at step 56 of {cfg.train.steps}"):
    sparselora_accuracy.one_run(cfg, str(tmp_path))
  assert not (tmp_path / "result.json").exists()


def test_a_finished_result_is_reused_without_training(tmp_path, monkeypatch):
  cfg = configs.finetune_config("quickstart")
  stored = {"eval_accuracy": 0.5, "eval_loss": 0.1, "steps": 3,
            "eval_set": sparselora_accuracy.eval_set(cfg)}
  runs.write_json(str(tmp_path / "result.json"), stored)
  monkeypatch.setattr(sparselora_accuracy.finetune, "finetune_and_evaluate",
                      lambda *a, **k: pytest.fail("trained again"))
  assert sparselora_accuracy.one_run(cfg, str(tmp_path)) == stored


def test_a_kept_result_or_plan_is_reused_on_a_fresh_machine_only_by_its_config_and_code(
    tmp_path, monkeypatch):
  trained = []

  def finetune_and_evaluate(cfg, workdir, quiet):
    trained.append(cfg.train.lr)
    return {"eval_loss": cfg.train.lr, "eval_accuracy": 0.5}
  monkeypatch.setattr(sparselora_accuracy.finetune, "finetune_and_evaluate",
                      finetune_and_evaluate)
  monkeypatch.setattr(sparselora_accuracy.metrics, "read_metrics",
                      lambda workdir: [{"step": s, "step_time": 1.0} for s in (10, 20, 30)])
  monkeypatch.setattr(sparselora_accuracy, "flops_per_step", lambda cfg: {"total": 1.0})
  store = str(tmp_path / "store")
  cfg = configs.finetune_config("quickstart")
  cfg.init.path = str(tmp_path / "machine_a" / "base.gguf")
  first = sparselora_accuracy.one_run(cfg, str(tmp_path / "machine_a" / "lora_s0"), store)
  assert trained == [cfg.train.lr] and first["eval_loss"] == cfg.train.lr
  kept = json.loads((tmp_path / "store" / "lora_s0.json").read_text())
  assert kept["result"] == first and kept["config"]["init"]["path"] == "base.gguf"

  # Another machine: its own workdir and base path, the same config and code: no training.
  other = cfg.copy_and_resolve_references()
  other.init.path = str(tmp_path / "machine_b" / "base.gguf")
  assert sparselora_accuracy.one_run(other, str(tmp_path / "b" / "lora_s0"), store) == first
  assert len(trained) == 1
  # Another learning rate, or other code, is trained again.
  other.train.lr = cfg.train.lr / 2
  assert sparselora_accuracy.one_run(other, str(tmp_path / "c" / "lora_s0"), store)[
      "eval_loss"] == other.train.lr
  version = runs.code_version()
  monkeypatch.setattr(runs, "code_version", lambda: {**version, "sources": "0" * 16})
  sparselora_accuracy.one_run(cfg, str(tmp_path / "d" / "lora_s0"), store)
  assert trained == [cfg.train.lr, other.train.lr, cfg.train.lr]

  # A calibrated plan is kept too: another machine copies it instead of calibrating.
  calls = []
  monkeypatch.setattr(sparselora_accuracy.calibrate, "calibrate",
                      lambda cfg, out, budget: calls.append(budget) or {"budget": budget})
  a = sparselora_accuracy.calibrated_plan(cfg, str(tmp_path / "a"), 0.05, store)
  elsewhere = cfg.copy_and_resolve_references()
  elsewhere.init.path = str(tmp_path / "machine_b" / "base.gguf")
  b = sparselora_accuracy.calibrated_plan(elsewhere, str(tmp_path / "b"), 0.05, store)
  assert calls == [0.05] and json.loads(open(b).read()) == json.loads(open(a).read())
  # the kept record is itself the plan file (with the store's fields beside it)
  kept = json.loads((tmp_path / "store" / "plan_b0.05.json").read_text())
  assert sparselora_accuracy.plan_of(kept) == json.loads(open(a).read())
  assert kept["budget"] == 0.05 and kept["name"] == "plan_b0.05"
  sparselora_accuracy.calibrated_plan(cfg, str(tmp_path / "e"), 0.02, store)   # another budget
  assert calls == [0.05, 0.02]


def test_a_workdirs_result_of_other_code_is_refused_not_reused(tmp_path, monkeypatch):
  cfg = configs.finetune_config("quickstart")
  monkeypatch.setattr(sparselora_accuracy.finetune, "finetune_and_evaluate",
                      lambda *a, **k: pytest.fail("trained"))
  stored = {"eval_accuracy": 0.5, "eval_loss": 0.1, "steps": 3,
            "eval_set": sparselora_accuracy.eval_set(cfg),
            "code_version": "Code version: commit abc, lost_jax sources 0123456789abcdef."}
  runs.write_json(str(tmp_path / "result.json"), stored)
  with pytest.raises(UserError, match="holds a run of other code"):
    sparselora_accuracy.one_run(cfg, str(tmp_path))
  stored["code_version"] = f"Code version: commit abc, lost_jax sources {runs.sources_hash()}."
  runs.write_json(str(tmp_path / "result.json"), stored)
  assert sparselora_accuracy.one_run(cfg, str(tmp_path)) == stored


def tiny_config(steps: int = 2):
  cfg = configs.finetune_config("quickstart")
  cfg.init.source = "random"
  cfg.model.update(dict(n_layers=2, d_model=32, ffn_dim=64, vocab_size=512))
  cfg.sparse.update(dict(ffn="0.5@1", attn="0.5@1"))
  cfg.data.update(dict(seq_len=64, max_prompt_len=56, train_size=64, eval_size=8,
                       max_new_tokens=4))
  cfg.train.update(dict(steps=steps, batch_size=4, accuracy_examples=4, ckpt_every=steps,
                        eval_every=steps, log_every=1))
  return cfg


@pytest.mark.slow
def test_a_result_of_another_eval_set_is_rescored_from_the_final_checkpoint(tmp_path,
                                                                           monkeypatch):
  monkeypatch.setattr(sparselora_accuracy, "flops_per_step", lambda cfg: {"total": 1.0})
  workdir, path = str(tmp_path), tmp_path / "result.json"
  first = sparselora_accuracy.one_run(tiny_config(), workdir)
  assert first["eval_set"] == sparselora_accuracy.eval_set(tiny_config())
  # The sparse run's loss under the dense forward, as the evaluate command scores it
  dense = finetune.evaluate_checkpoint(tiny_config(), workdir, forward="dense", quiet=True)
  assert first["eval_loss_dense"] == dense["eval_loss"] != first["eval_loss"]
  assert first["eval_set"]["size"] == 8 and first["eval_set"]["accuracy"] == 4
  train_rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]

  # A result from before eval sets were recorded: re-scored on the same set, the restored
  # final adapters give the scores the run ended with (and nothing is trained).
  old = {k: v for k, v in first.items() if k != "eval_set"}
  runs.write_json(str(path), old)
  again = sparselora_accuracy.one_run(tiny_config(), workdir)
  assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)
  assert again["eval_accuracy"] == first["eval_accuracy"]
  assert again["step_time"] == first["step_time"] and again["previous"]["eval_set"] is None
  assert json.loads(path.read_text()) == again

  # The code now makes other held-out problems (as when the split was topped up to
  # eval_size): the result is re-scored on them, still without training.
  held_out = instruct.held_out
  monkeypatch.setattr(instruct, "held_out",
                      lambda make, count, seed, seen: held_out(make, count, seed + 7, seen))
  moved = sparselora_accuracy.one_run(tiny_config(), workdir)
  assert moved["eval_set"]["size"] == 8 and moved["eval_set"] != first["eval_set"]
  assert moved["eval_loss"] != pytest.approx(first["eval_loss"], rel=1e-6)
  assert moved["previous"]["eval_loss"] == again["eval_loss"]
  assert moved["eval_loss_dense"] != first["eval_loss_dense"]     # scored on the new set too
  assert moved["previous"]["eval_loss_dense"] == first["eval_loss_dense"]
  assert [r for r in metrics.read_metrics(workdir) if "loss" in r] == train_rows
  assert sparselora_accuracy.one_run(tiny_config(), workdir) == moved   # current: reused

  # A run without its final checkpoint cannot be re-scored: it says so.
  longer = tiny_config(steps=4)
  runs.write_json(str(path), old)
  with pytest.raises(UserError, match="no checkpoint of step 4"):
    sparselora_accuracy.one_run(longer, workdir)


@pytest.mark.slow
def test_a_calibrated_variant_trains_on_the_plan_calibrate_chose(tmp_path, monkeypatch):
  monkeypatch.setattr(sparselora_accuracy, "flops_per_step", lambda cfg: {"total": 1.0})
  cfg = tiny_config()
  cfg.sparse.calibration_sparsities = "0.5"
  root = str(tmp_path)
  path = sparselora_accuracy.calibrated_plan(cfg, root, 0.5)
  plan = json.loads(open(path).read())
  assert path == sparselora_accuracy.plan_path(root, 0.5) and plan["budget"] == 0.5
  assert plan["wall_s"] > 0 and plan["increase"] <= 0.5
  monkeypatch.setattr(sparselora_accuracy.calibrate, "calibrate",
                      lambda *a, **k: pytest.fail("calibrated again"))
  assert sparselora_accuracy.calibrated_plan(cfg, root, 0.5) == path
  specs = sparselora_accuracy.run_specs(1, [0.5], root)
  assert specs["calibrated_b0.5_s0"] == {"sparse.plan": path, "seed": 0}
  run = sparselora_accuracy.apply(cfg, specs["calibrated_b0.5_s0"])
  result = sparselora_accuracy.one_run(run, str(tmp_path / "calibrated_b0.5_s0"))
  trained = json.loads((tmp_path / "calibrated_b0.5_s0" / "config.json").read_text())["sparse"]
  assert (trained["ffn"], trained["attn"]) == (plan["ffn_spec"], plan["attn_spec"])
  assert "eval_loss_dense" in result
  text = sparselora_accuracy.report({"calibrated_b0.5_s0": result}, {}, cfg, "cmd", seeds=1,
                                    plans={0.5: plan})
  assert f"| calibrated_b0.5 | 0.5 | {plan['ffn_spec'] or 'dense'} |" in text


def test_report_tells_pending_runs_from_finished_ones_and_dense_layers():
  cfg = configs.finetune_config("quickstart")
  cfg.init.path = "/models/base.gguf"
  scored = sparselora_accuracy.eval_set(cfg)
  run = lambda acc, step_time, flops: {"eval_accuracy": acc, "eval_loss": 0.05,
                                       "step_time": step_time, "flops_per_step": flops,
                                       "eval_set": scored}
  results = {"zero_shot": run(0.02, None, None), "lora_s0": run(0.6, 9.0, 2e12),
             "lora_s1": run(0.62, 9.0, 2e12), "sparselora_s0": run(0.3, 8.0, 1.5e12)}
  for name in ("zero_shot", "lora_s0", "lora_s1"):
    results[name]["code_version"] = "Code version: commit abc, lost_jax sources 12."
  results["lora_s0"]["eval_loss_dense"] = results["lora_s1"]["eval_loss_dense"] = 0.05
  results["sparselora_s0"]["eval_loss_dense"] = 0.07    # its trained-forward loss: 0.05
  ov = {"ffn": {"12": 0.15, "16": 0.25}, "attn_v": {"16": 0.5}}    # keys as read from JSON
  text = sparselora_accuracy.report(results, ov, cfg, "cmd", seeds=2, budgets=[0.02])
  rows = {}
  for line in text.splitlines():
    if line.startswith("| ") and not line.startswith("| ---"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      rows.setdefault(cells[0], cells[1:])    # the first table's row, not the target's
  # accuracy, seed range, dense eval loss, trained-forward eval loss, trained forward, step s,
  # zero-shot: no steps; a dense run's dense eval loss is its own eval loss
  assert rows["zero_shot"][:6] == ["0.020", "-", "0.0500", "0.0500", "dense", "-"]
  assert rows["lora"][:2] == ["0.610 ± 0.014 (n=2)", "0.600 – 0.620"]   # sample std 0.02/√2
  assert rows["lora"][2] == "0.0500 ± 0.0000 (n=2)"
  assert rows["sparselora"][2:4] == ["0.0700", "0.0500"]
  assert rows["lora"][4] == "dense" and rows["sparselora"][4] == "sparse context"
  assert rows["sparse_outputs"][4] == "sparse (outputs too)"
  assert rows["sparselora"][0] == "0.300" and rows["sparselora"][7] == "0.75"
  assert "Runs trained on: zero_shot, lora_s0, lora_s1: commit abc" in text
  assert "sparselora_s0: not recorded in the result" in text
  assert [rows["random_channels"][i] for i in (0, 2, 3)] == ["pending"] * 3   # not run yet
  assert rows["calibrated_b0.02"][0] == "pending"          # asked for, not calibrated yet
  assert "lost_jax sources 12; sparselora_s0" in text     # one full stop, at the end
  assert rows["12"] == ["0.15", "-"] and rows["16"] == ["0.25", "0.50"]


def test_runs_go_seed_by_seed_so_a_partial_sweep_compares_every_method():
  names = list(sparselora_accuracy.run_specs(2, [0.02], "/root"))
  assert names[:6] == ["zero_shot", "lora_s0", "calibrated_b0.02_s0", "sparselora_s0",
                       "sparselora_late_s0", "lora_s1"]
  assert names[-3:] == list(sparselora_accuracy.ABLATIONS) and len(names) == 1 + 2 * 4 + 3


def test_the_target_check_is_computed_from_seed_ranges_flops_and_the_one_point_bound():
  run = lambda acc, flops: {"eval_accuracy": acc, "flops_per_step": flops}
  lora = {"lora_s0": run(0.60, 10.0), "lora_s1": run(0.62, 10.0), "zero_shot": run(0.02, None)}
  # 0.79x FLOPs, mean 0.605 (-0.5 points), ranges overlap: met; 0.9x: too dear
  close = {"calibrated_b0.02_s0": run(0.60, 7.9), "calibrated_b0.02_s1": run(0.61, 7.9),
           "sparselora_late_s0": run(0.62, 9.0)}
  text = "\n".join(sparselora_accuracy.target_lines({**lora, **close}, seeds=2))
  assert "met by calibrated_b0.02; the cheapest, calibrated_b0.02, runs at 0.79x" in text
  assert "| calibrated_b0.02 | 2 | 0.605 | -0.5 | yes | 0.79 | yes |" in text
  assert "| sparselora_late | 1 | 0.620 | +1.0 | yes | 0.90 | no |" in text
  # 1.5 points below LoRA's mean though the ranges overlap: not within one point
  far = {"calibrated_b0.02_s0": run(0.58, 7.9), "calibrated_b0.02_s1": run(0.61, 7.9)}
  text = "\n".join(sparselora_accuracy.target_lines({**lora, **far}, seeds=2))
  assert "not met by any finished plan; the most accurate at <= 0.80x FLOPs is " \
         "calibrated_b0.02 (0.595, -1.5 points, 0.79x)" in text
  # the same accuracy at 0.81x: the FLOPs bound fails; it is still the cheapest within 1 point
  dear = {"calibrated_b0.02_s0": run(0.60, 8.1), "calibrated_b0.02_s1": run(0.61, 8.1)}
  text = "\n".join(sparselora_accuracy.target_lines({**lora, **dear}, seeds=2))
  assert "not met" in text and "the cheapest within 1 point is calibrated_b0.02 (0.81x" in text
  # ranges apart though the mean is within one point
  apart = {"calibrated_b0.02_s0": run(0.595, 7.9)}
  lora_tight = {"lora_s0": run(0.60, 10.0), "lora_s1": run(0.60, 10.0)}
  text = "\n".join(sparselora_accuracy.target_lines({**lora_tight, **apart}, seeds=2))
  assert "| calibrated_b0.02 | 1 | 0.595 | -0.5 | no | 0.79 | no |" in text
  unchecked = sparselora_accuracy.target_lines(lora, seeds=2)
  assert "not checked yet" in unchecked[0]
  # its table is still there (empty): the README quotes the page's tables by position
  assert common.tables("\n".join(unchecked)) == [
      "| plan | seeds | accuracy | vs LoRA (points) | seed ranges overlap LoRA's | "
      "FLOPs vs LoRA | meets the target |\n|---|---|---|---|---|---|---|\n"]


def test_the_command_renders_the_page_from_the_store_alone(tmp_path):
  # --report_only on a checkout without the runs' workdirs: results, plan and overlap come
  # from the store, kept for this config and code as a finished sweep keeps them.
  cfg = configs.finetune_config("quickstart")
  store = str(tmp_path / "store")
  lora = sparselora_accuracy.apply(cfg, {"sparse.enabled": False, "seed": 0})
  result = {"eval_accuracy": 0.25, "eval_loss": 0.5, "eval_loss_dense": 0.5, "steps": 3,
            "flops_per_step": 2e12, "step_time": 1.0, "eval_set":
            sparselora_accuracy.eval_set(cfg)}
  sparselora_accuracy.store_record(store, "lora_s0", lora, result=result)
  sparselora_accuracy.store_record(store, "overlap", sparselora_accuracy.apply(cfg, {"seed": 0}),
                                   overlap={"ffn": {"3": 0.42}, "attn_v": {}})
  # a workdir's result of other code is not shown as this code's
  runs.write_json(str(tmp_path / "none" / "sparselora_s0" / "result.json"),
                  {**result, "code_version": "Code version: commit abc, lost_jax sources "
                                             "0123456789abcdef."})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.sparselora_accuracy",
       "--config=configs/finetune.py:quickstart", "--report_only", "--seeds=1", "--budgets=",
       f"--out_dir={tmp_path}", f"--results_dir={store}", f"--workdir_root={tmp_path / 'none'}"],
      cwd=root, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (tmp_path / "sparselora_smollm2.md").read_text()
  assert "| lora | 0.250 | - | 0.5000 | 0.5000 | dense |" in text
  assert "| 3 | 0.42 | - |" in text and "| sparselora | pending |" in text


def test_a_calibrated_plans_search_is_summarised_by_its_additive_plan():
  plan = {"search": [{"additive_budget": 0.02, "parts": 40, "increase": 0.16},
                     {"additive_budget": 0.001, "parts": 9, "increase": 0.015}]}
  assert sparselora_accuracy._additive(plan) == "40, +16.00%"
  assert sparselora_accuracy._additive({}) == "-"


def test_a_plans_quiet_speedup_comes_from_the_bench_that_timed_that_plan_on_this_code():
  cfg = tiny_config()       # 2 layers; sparselora's plan: FFN and attention 0.5 on layer 1
  shape = sparselora_accuracy.base_shape(cfg)
  assert shape == dict(n_layers=2, d_model=32, ffn_dim=64, n_heads=cfg.model.n_heads,
                       n_kv_heads=cfg.model.n_kv_heads, vocab_size=512)

  def rec(speedup, ffn=(0.0, 0.5), attn=(0.0, 0.5), sources=None, batch=4, **kw):
    return {"code": {"sources": sources or runs.code_version()["sources"]},
            "shape": {**shape, **kw}, "plan": {"ffn": list(ffn), "attn": list(attn)},
            "settings": {"batch": batch, "seq_len": 64}, "load": [0.1, 0.3],
            "summary": {"speedup": speedup, "pair_speedup_q25": 1.0, "pair_speedup_q75": 2.0}}
  records = {"a_other_code.md": rec(9.0, sources="0" * 16), "b_other_batch.md": rec(8.0, batch=8),
             "c_other_width.md": rec(7.0, d_model=64), "d_other_plan.md": rec(6.0, ffn=(0.5, 0.5)),
             "e.md": rec(1.25), "f_calibrated.md": rec(1.5, ffn=(0.9, 0.0), attn=(0.0, 0.0))}
  plans = {0.05: {"ffn": [0.9, 0.0], "attn": [0.0, 0.0]}}
  speed = sparselora_accuracy.quiet_speedups(cfg, 1, [0.05], plans, shape, records)
  assert {k: v[0] for k, v in speed.items()} == {"sparselora": "e.md",
                                                 "calibrated_b0.05": "f_calibrated.md"}
  assert sparselora_accuracy.quiet_speedups(cfg, 1, [0.05], plans, None, records) == {}
  text = sparselora_accuracy.report({}, {}, cfg, "cmd", seeds=1, budgets=[0.05],
                                    speed=speed)
  rows = {}
  for line in text.splitlines():
    if line.startswith("| ") and not line.startswith("| ---"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      rows.setdefault(cells[0], cells[1:])
  assert rows["run"][8] == "quiet step speedup"
  assert [rows[n][8] for n in ("lora", "sparselora", "calibrated_b0.05", "sparselora_late",
                               "random_channels")] == ["1.00x", "1.25x", "1.50x", "-", "-"]
  assert "sparselora: docs/benchmarks/e.md (load 0.1 - 0.3" in text


def test_what_a_budget_allows_is_set_beside_the_fine_tuned_losses():
  results = {"lora_s0": {"eval_loss": 0.04}, "lora_s1": {"eval_loss": 0.06},
             "calibrated_b0.02_s0": {"eval_loss": 0.07, "eval_loss_dense": 0.09}}
  plans = {0.02: {"dense_loss": 1.0, "plan_loss": 1.004},
           0.05: {"dense_loss": 1.0, "plan_loss": 1.03}}
  [text, _] = sparselora_accuracy.budget_lines(results, plans)
  assert "dense loss on the calibration batches (1.0000 nats), 20x LoRA's mean final eval " \
         "loss (0.0500, n=2)" in text
  assert ("budget 0.02 allows +0.0200 nats (40% of LoRA's final eval loss) and its plan used "
          "+0.0040; its fine-tuned runs' eval loss is +0.0200 nats from LoRA's under their "
          "sparse-context forward and +0.0400 under the dense forward (n=1)") in text
  assert "budget 0.05 allows +0.0500 nats (100% of LoRA's final eval loss) and its plan used " \
         "+0.0300." in text
  assert sparselora_accuracy.budget_lines({}, plans) == []
