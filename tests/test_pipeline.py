"""End to end: exact resume, workdir protection, and the CLI on the built-in corpus."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lost_jax import configs
from lost_jax.training import metrics
from lost_jax.recipes import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_run_config(steps: int = 8):
  cfg = configs.pretrain_config("quickstart", "lost")
  cfg.model.update(dict(vocab_size=512, d_model=64, ffn_dim=128, n_layers=2, n_heads=4,
                        n_kv_heads=2))
  cfg.model.linear.rank = 8
  cfg.data.seq_len = 32
  cfg.train.update(dict(precision="float32", steps=steps, batch_size=4, eval_every=4,
                        eval_batches=2, log_every=1, ckpt_every=2, warmup_frac=0.25))
  return cfg


def losses(workdir):
  return [r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r]


def final_params(workdir):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                              item_names=("state", "rest", "data", "meta"))
  step = mgr.latest_step()
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  return step, jax.tree.leaves(out["state"]["params"])


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_exact(tmp_path, optimizer):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  cfg = small_run_config(steps=8)
  cfg.train.optimizer = optimizer      # 8-bit: uint8 codes + float32 scales round-trip exactly
  pretrain.train_and_evaluate(cfg, straight, quiet=True)
  first = pretrain.train_and_evaluate(cfg, resumed, quiet=True, stop_at=4)
  assert first["step"] == 4
  pretrain.train_and_evaluate(cfg, resumed, quiet=True)
  a, b = losses(straight), losses(resumed)
  assert len(a) == len(b) == 8
  assert a == b          # identical float32 losses at every step
  step_a, params_a = final_params(straight)
  step_b, params_b = final_params(resumed)
  assert step_a == step_b == 8
  for x, y in zip(params_a, params_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_workdir_of_another_model_is_refused_before_overwrite(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = small_run_config(steps=2)
  pretrain.train_and_evaluate(cfg, workdir, quiet=True)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config_before = open(os.path.join(workdir, "config.json")).read()
  other = small_run_config(steps=4)
  other.model.linear.rank = 16
  with pytest.raises(ValueError, match="model.linear.rank"):
    pretrain.train_and_evaluate(other, workdir, quiet=True)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_tokenizer_vocab_mismatch_is_refused(tmp_path):
  cfg = small_run_config(steps=2)
  vocab = tmp_path / "vocab.model"
  import sentencepiece as spm  # a user tokenizer of 300 pieces for a 512-vocab model
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([f"line {i} of some text about numbers {i * 7}" for i in range(400)]),
      model_writer=open(vocab, "wb"), vocab_size=300, model_type="unigram")
  cfg.data.tokenizer = str(vocab)
  with pytest.raises(ValueError, match="vocab"):
    pretrain.train_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


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
