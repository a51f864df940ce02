"""End to end: exact resume, workdir protection, and the CLI on the built-in corpus."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import ROOT, base_pretrain_config, pipeline_config, saved_state
from lost_jax import configs
from lost_jax.recipes import pretrain
from lost_jax.training import metrics


def losses(workdir):
  return [r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_exact(tmp_path, optimizer):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  cfg = pipeline_config(steps=8)
  cfg.train.optimizer = optimizer      # 8-bit: uint8 codes + float32 scales round-trip exactly
  pretrain.train_and_evaluate(cfg, straight, quiet=True)
  first = pretrain.train_and_evaluate(cfg, resumed, quiet=True, stop_at=4)
  assert first["step"] == 4
  pretrain.train_and_evaluate(cfg, resumed, quiet=True)
  a, b = losses(straight), losses(resumed)
  assert len(a) == len(b) == 8
  assert a == b          # identical float32 losses at every step
  step_a, state_a = saved_state(straight)
  step_b, state_b = saved_state(resumed)
  assert step_a == step_b == 8
  for x, y in zip(jax.tree.leaves(state_a["params"]), jax.tree.leaves(state_b["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_workdir_of_another_model_is_refused_before_overwrite(pretrained_copy):
  workdir = pretrained_copy
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config_before = open(os.path.join(workdir, "config.json")).read()
  other = base_pretrain_config()
  other.train.steps = 80
  other.model.linear = configs.linear_config("lost", rank=16)
  with pytest.raises(ValueError, match="model.linear.kind"):
    pretrain.train_and_evaluate(other, workdir, quiet=True)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_tokenizer_vocab_mismatch_is_refused(tmp_path):
  cfg = pipeline_config(steps=2)
  vocab = tmp_path / "vocab.model"
  import sentencepiece as spm  # a user tokenizer of 300 pieces for a 512-vocab model
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([f"line {i} of some text about numbers {i * 7}" for i in range(400)]),
      model_writer=open(vocab, "wb"), vocab_size=300, model_type="unigram")
  cfg.data.tokenizer = str(vocab)
  with pytest.raises(ValueError, match="vocab"):
    pretrain.train_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_curve_is_drawn_once_it_has_two_steps(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  metrics.append_jsonl(path, {"step": 1, "loss": 2.0, "eval_ppl": 9.0})
  metrics.append_jsonl(path, {"step": 1, "loss": 2.0})       # step 1 again (a resume)
  metrics.plot_run(str(tmp_path), "run")
  assert not list(tmp_path.glob("*.png"))
  metrics.append_jsonl(path, {"step": 2, "loss": 1.5})
  metrics.plot_run(str(tmp_path), "run")
  assert [p.name for p in tmp_path.glob("*.png")] == ["train_loss.png"]
  assert (tmp_path / "train_loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_cli_trains_and_writes_checkpoint_metrics_and_events(tmp_path):
  workdir = tmp_path / "cli"
  args = [sys.executable, "-m", "lost_jax.main", "pretrain",
          f"--config={ROOT}/configs/pretrain.py:quickstart,lost", f"--workdir={workdir}",
          "--config.train.steps=6", "--config.train.eval_every=3",
          "--config.train.eval_batches=1", "--config.train.log_every=2",
          "--config.train.ckpt_every=3", "--config.model.n_layers=1",
          "--config.train.batch_size=4", "--config.data.seq_len=64"]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "perplexity" in out and "tok/s" in out
  assert "done: step 6" in proc.stdout
  rows = metrics.read_metrics(str(workdir))
  assert [r["step"] for r in rows if "eval_ppl" in r] == [3, 6]
  assert any(name.startswith("events") for name in os.listdir(workdir / "tb"))
  assert "6" in os.listdir(workdir / "checkpoints")
  saved = json.load(open(workdir / "config.json"))
  assert saved["model"]["n_layers"] == 1 and saved["train"]["steps"] == 6
  assert (workdir / "eval_ppl.png").exists()
