"""Evaluation alone (`lost_jax.recipes.evaluate`, `python -m lost_jax.main evaluate`): a run's
checkpoint scores what the run printed when it reached that step; a base alone is zero-shot."""

import os
import re
import shutil
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, subprocess_env, tiny_finetune_config, tiny_pretrain_config
from lost_jax.commands import evaluate as evaluate_command
from lost_jax.errors import UserError
from lost_jax.data import tokenizer
from lost_jax.recipes import evaluate, finetune, pretrain, saved_run
from lost_jax.training import metrics


def _finetune_config(steps: int):
  """tiny_finetune_config on a random 4-layer base (its sparse layers are 1-3)."""
  cfg = tiny_finetune_config(None, steps=steps)
  cfg.model.n_layers = 4
  cfg.train.eval_every = cfg.train.ckpt_every = max(steps, 1)
  return cfg


def _evals(workdir) -> dict[int, dict]:
  """{step: the eval row the run wrote at that step} of metrics.jsonl."""
  return {r["step"]: r for r in metrics.read_metrics(str(workdir)) if "eval_loss" in r}


def _dense_eval_loss(workdir) -> float:
  """A fine-tune's eval loss with every channel: token NLL in NumPy (float64) from the logits
  of its newest checkpoint's model (saved_run.load_run), over the run's eval batches."""
  run = saved_run.load_run(workdir)
  tok = tokenizer.load_tokenizer(run.cfg.data, run.cfg.model.vocab_size)
  nll = weight = 0.0
  for b in finetune.eval_data(run.cfg, tok)[0]:
    logits = np.asarray(run.model(jnp.asarray(b["inputs"]), jnp.asarray(b["positions"]),
                                  jnp.asarray(b["segment_ids"])), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(b["targets"])[..., None], -1)[..., 0]
    w = np.asarray(b["weights"], np.float64)
    nll -= float((picked * w).sum())
    weight += float(w.sum())
  return nll / weight


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
  """A finished 6-step tiny pre-training run with checkpoints (and evals) at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("evaluate") / "pre")
  cfg = tiny_pretrain_config("lost", steps=6, batch_size=4, eval_every=3, eval_batches=2,
                             log_every=1, ckpt_every=3, keep_checkpoints=3)
  pretrain.train_and_evaluate(cfg, workdir, quiet=True)
  return workdir


@pytest.mark.slow
def test_a_pretraining_runs_checkpoints_score_what_the_run_printed(pretrained, tmp_path):
  workdir = shutil.copytree(pretrained, str(tmp_path / "run"))
  printed = _evals(workdir)
  newest = evaluate.evaluate_run(workdir, quiet=True)
  older = evaluate.evaluate_run(workdir, step=3, quiet=True)
  assert newest["step"] == 6 and older["step"] == 3
  for out in (newest, older):
    for key in ("eval_loss", "eval_ppl", "eval_tokens"):
      assert out[key] == pytest.approx(printed[out["step"]][key], rel=1e-6), key
  assert printed[3]["eval_loss"] != pytest.approx(printed[6]["eval_loss"], rel=1e-6)
  # Labelled with the step and checkpoint, in evaluations.jsonl only.
  rows = metrics.read_evaluations(workdir)
  assert [(r["step"], r["checkpoint"].rsplit("/", 2)[1:]) for r in rows] == [
      (6, ["checkpoints", "6"]), (3, ["checkpoints", "3"])]
  assert all(r["recipe"] == "pretrain" and r["time"].endswith("Z") for r in rows)
  assert metrics.read_metrics(workdir) == metrics.read_metrics(pretrained)


@pytest.mark.slow
def test_the_command_prints_the_step_it_evaluated(pretrained, tmp_path):
  workdir = shutil.copytree(pretrained, str(tmp_path / "run"))
  # --forward=dense: a pre-training run's forward is dense either way
  proc = subprocess.run([sys.executable, "-m", "lost_jax.main", "evaluate",
                         f"--workdir={workdir}", "--step=3", "--forward=dense"],
                        capture_output=True, text=True, timeout=600, cwd=ROOT,
                        env=subprocess_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  done = re.search(r"^done: step (\d+) \| eval_loss (\S+) \| eval_ppl (\S+)", proc.stdout, re.M)
  assert done and int(done[1]) == 3, proc.stdout
  assert float(done[2]) == pytest.approx(_evals(workdir)[3]["eval_loss"], rel=1e-3)


@pytest.mark.slow
def test_a_finetunes_checkpoints_score_its_loss_and_accuracy(tmp_path):
  workdir = str(tmp_path / "ft")
  cfg = _finetune_config(4)
  cfg.train.update(dict(ckpt_every=2, eval_every=2, keep_checkpoints=3))
  finetune.finetune_and_evaluate(cfg, workdir, quiet=True)
  printed = _evals(workdir)
  for step in (None, 2):
    out = evaluate.evaluate_run(workdir, step, quiet=True)
    assert out["step"] == (step or 4)
    for key in ("eval_loss", "eval_tokens", "eval_accuracy"):
      assert out[key] == pytest.approx(printed[out["step"]][key], rel=1e-6), key
  assert printed[2]["eval_loss"] != pytest.approx(printed[4]["eval_loss"], rel=1e-6)
  # Under the dense forward: the same adapters' loss with every channel, as derived in NumPy
  # from the logits of the loaded run; the sparse-context loss the run printed is another.
  dense = evaluate.evaluate_run(workdir, quiet=True, forward="dense")
  assert dense["eval_loss"] == pytest.approx(_dense_eval_loss(workdir), rel=1e-5)
  assert abs(dense["eval_loss"] / printed[4]["eval_loss"] - 1) > 1e-3
  assert dense["eval_tokens"] == printed[4]["eval_tokens"]
  assert [r["forward"] for r in metrics.read_evaluations(workdir)] == ["trained"] * 2 + ["dense"]
  # Training to fewer steps than the checkpoint's is refused (before the base is loaded).
  fewer = _finetune_config(0)
  with pytest.raises(UserError, match="holds a checkpoint of step 4, past config.train.steps=0"
                     r".*lost_jax.main evaluate --workdir=.*For the base alone \(zero-shot, no "
                     r"adapters\): `python -m lost_jax.main evaluate --config="):
    finetune.finetune_and_evaluate(fewer, workdir, quiet=True)
  assert max(_evals(workdir)) == 4
  # Another estimator rank is another run (its fingerprint), refused before the estimator
  # cache is read or rebuilt.
  estimators = os.path.join(workdir, "estimators.npz")
  cached = open(estimators, "rb").read()
  other_rank = _finetune_config(6)
  other_rank.sparse.estimator_rank = 4
  with pytest.raises(UserError, match="sparse.estimator_rank: checkpoint 8 vs run 4"):
    finetune.finetune_and_evaluate(other_rank, workdir, quiet=True)
  assert open(estimators, "rb").read() == cached


@pytest.mark.slow
def test_a_base_alone_is_scored_zero_shot_as_a_zero_step_finetune(tmp_path):
  zero = _finetune_config(0)
  trained_zero = finetune.finetune_and_evaluate(zero, str(tmp_path / "zero"), quiet=True)
  # A zero-step fine-tune is labelled zero-shot: in its result and in evaluations.jsonl (its
  # metrics.jsonl row stays step 0, the adapters' starting point).
  assert trained_zero["model"] == evaluate.ZERO_SHOT and trained_zero["step"] == 0
  (zero_row,) = metrics.read_evaluations(str(tmp_path / "zero"))
  assert zero_row["model"] == evaluate.ZERO_SHOT and zero_row["base"] == "random"
  assert [(r["step"], type(r["step"])) for r in metrics.read_metrics(str(tmp_path / "zero"))
          ] == [(0, int)]
  cfg = _finetune_config(50)        # the preset's own step count
  out = evaluate.evaluate_base(cfg, str(tmp_path / "base"), quiet=True)
  assert out["model"] == evaluate.ZERO_SHOT
  for key in ("eval_loss", "eval_tokens", "eval_accuracy"):
    assert out[key] == pytest.approx(trained_zero[key], rel=1e-6), key
  (row,) = metrics.read_evaluations(str(tmp_path / "base"))
  assert row["model"] == evaluate.ZERO_SHOT and row["base"] == "random" and "step" not in row
  assert not metrics.read_metrics(str(tmp_path / "base"))


class _Flags:
  """What lost_jax.main hands a command: the flag values, and flags["config"].present."""

  def __init__(self, workdir, step, config, forward="trained"):
    self.workdir, self.step, self.config, self.forward = workdir, step, config, forward

  def __getitem__(self, name):
    return types.SimpleNamespace(present=getattr(self, name) is not None)


@pytest.mark.parametrize("make, flags, message", [
    (None, dict(), r"is not a lost_jax run \(.*config.json is missing"),
    ("empty", dict(), r"is not a lost_jax run \(.*config.json is missing"),
    ("no_checkpoint", dict(), "has no checkpoint yet"),
    pytest.param("run", dict(step=5), r"has no checkpoint of step 5 \(saved: 3, 6;",
                 marks=pytest.mark.slow),
    pytest.param("run", dict(step=-1), "--step=-1 is negative", marks=pytest.mark.slow),
    pytest.param("run", dict(config="finetune"), "holds a run's checkpoints",
                 marks=pytest.mark.slow),
    ("empty", dict(config="pretrain"), "is a pre-training config"),
    ("empty", dict(config="finetune", step=3), "--step picks a run's checkpoint"),
])
def test_evaluate_refuses_in_one_line(make, flags, message, request, tmp_path):
  from lost_jax import configs  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  if make == "run":             # refused before anything is written
    workdir = request.getfixturevalue("pretrained")
  elif make:
    workdir.mkdir()
  if make == "no_checkpoint":   # a run that has not saved yet
    (workdir / "config.json").write_text(configs.pretrain_config("quickstart", "lost").to_json())
  config = {"pretrain": lambda: configs.pretrain_config("quickstart", "lost"),
            "finetune": lambda: configs.finetune_config("quickstart")}.get(flags.pop(
                "config", None), lambda: None)()
  with pytest.raises(UserError, match=message) as e:
    evaluate_command.main(_Flags(str(workdir), flags.get("step"), config))
  assert "Fix:" in str(e.value) and "\n" not in str(e.value)
