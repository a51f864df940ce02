"""lost_jax.checkpoint: what a resumed run may and may not change."""

import json
import shutil

import numpy as np
import pytest

from helpers import base_pretrain_config, tiny_pretrain_config
from lost_jax import configs
from lost_jax.errors import UserError
from lost_jax.recipes import pretrain
from lost_jax.training import checkpoint, metrics


def _fp(cfg):
  return checkpoint.model_fingerprint(cfg, cfg.model.vocab_size)


def test_settings_that_change_a_runs_meaning_are_refused_and_schedule_changes_listed():
  base = configs.pretrain_config("quickstart", "lost")
  other = configs.pretrain_config("quickstart", "lost")
  other.data.seq_len = 2 * base.data.seq_len
  other.train.batch_size = 2 * base.train.batch_size
  other.data.source, other.data.files = "files", "/data/*.jsonl"
  other.model.linear.sparsity = 0.02
  other.train.lr, other.train.steps = 1e-3, 600
  other.data.worker_count = 4                      # does not change the examples
  refused, allowed = checkpoint.compare_fingerprints(_fp(base), _fp(other))
  L, B = base.data.seq_len, base.train.batch_size
  assert refused == ["data.files: checkpoint '' vs run '/data/*.jsonl'",
                     f"data.seq_len: checkpoint {L} vs run {2 * L}",
                     "data.source: checkpoint 'stdlib' vs run 'files'",
                     f"global_batch: checkpoint {B} vs run {2 * B}",
                     "model.linear.sparsity: checkpoint 0.01 vs run 0.02",
                     f"seq_len: checkpoint {L} vs run {2 * L}"], refused
  assert allowed == [f"schedule.lr: checkpoint {base.train.lr} vs run 0.001",
                     f"schedule.steps: checkpoint {base.train.steps} vs run 600"], allowed
  assert checkpoint.compare_fingerprints(_fp(base), _fp(base)) == ([], [])
  # A checkpoint of an older version (model, seq_len and vocab only) compares what it has.
  old = {k: _fp(base)[k] for k in ("model", "seq_len", "tokenizer_vocab")}
  assert checkpoint.compare_fingerprints(old, _fp(other))[0] == [
      "model.linear.sparsity: checkpoint 0.01 vs run 0.02", f"seq_len: checkpoint {L} vs run {2 * L}"]


@pytest.mark.slow
def test_resume_refuses_a_new_global_batch_and_accepts_a_new_step_count(pretrained_copy, capsys):
  workdir = pretrained_copy      # 60 steps of global batch 8
  bigger = base_pretrain_config()
  bigger.train.batch_size = 16
  with pytest.raises(ValueError, match="global_batch: checkpoint 8 vs run 16"):
    pretrain.train_and_evaluate(bigger, workdir, quiet=True)
  longer = base_pretrain_config()
  longer.train.steps = 62
  assert pretrain.train_and_evaluate(longer, workdir, quiet=True)["step"] == 62
  assert "schedule.steps: checkpoint 60 vs run 62" in capsys.readouterr().out


def _numpy_lr(t: int, length: int, lr: float, warmup_frac: float, min_ratio: float) -> float:
  """Linear warmup over int(warmup_frac * length) steps, cosine to min_ratio * lr at `length`,
  held after it (written out in NumPy, independently of optax)."""
  warmup = max(1, int(warmup_frac * length))
  if t < warmup:
    return lr * t / warmup
  frac = min(t - warmup, length - warmup) / (length - warmup)
  end = lr * min_ratio
  return float(end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac)))


def _lrs(workdir) -> dict[int, float]:
  """{step: lr it trained with}; the row of step k logs the schedule at k - 1."""
  return {r["step"]: r["lr"] for r in metrics.read_metrics(str(workdir)) if "lr" in r}


@pytest.mark.slow
def test_more_steps_stretch_the_schedule_or_hold_its_final_lr(tmp_path, capsys):
  settings = dict(steps=6, batch_size=2, log_every=1, ckpt_every=6, eval_every=100,
                  eval_batches=1, lr=1e-3, warmup_frac=0.34, min_lr_ratio=0.1)
  cfg = lambda **kw: tiny_pretrain_config("full_rank", rank=0, **{**settings, **kw})
  lr = lambda t, length: _numpy_lr(t - 1, length, 1e-3, 0.34, 0.1)
  first = str(tmp_path / "stretch")
  pretrain.train_and_evaluate(cfg(), first, quiet=True)
  second = shutil.copytree(first, str(tmp_path / "constant"))
  assert [_lrs(first)[t] for t in range(1, 7)] == pytest.approx(
      [lr(t, 6) for t in range(1, 7)], rel=1e-5)

  pretrain.train_and_evaluate(cfg(steps=10), first, quiet=True)
  out = capsys.readouterr().out
  assert (f"rebuilt over 10 steps instead of 6, so the lr at the resumed step 6 moves from "
          f"{lr(7, 6):.3e} to {lr(7, 10):.3e}") in out, out
  assert [_lrs(first)[t] for t in range(7, 11)] == pytest.approx(
      [lr(t, 10) for t in range(7, 11)], rel=1e-5)

  pretrain.train_and_evaluate(cfg(steps=10, extend="constant"), second, quiet=True)
  assert "the 6-step schedule is kept" in capsys.readouterr().out
  assert [_lrs(second)[t] for t in range(7, 11)] == pytest.approx([1e-4] * 4, rel=1e-5)
  # The kept length is recorded: a later resume keeps it (not the 10 steps of the last run).
  pretrain.train_and_evaluate(cfg(steps=12, extend="constant"), second, quiet=True)
  assert [_lrs(second)[t] for t in (11, 12)] == pytest.approx([1e-4] * 2, rel=1e-5)
  assert json.load(open(f"{second}/config.json"))["train"]["schedule_steps"] == 6
  # ... until a stretch rebuilds it over the new count.
  pretrain.train_and_evaluate(cfg(steps=14), second, quiet=True)
  assert [_lrs(second)[t] for t in (13, 14)] == pytest.approx(
      [lr(t, 14) for t in (13, 14)], rel=1e-5)

  with pytest.raises(UserError, match="holds a checkpoint of step 14, past "
                     "config.train.steps=8.*lost_jax.main evaluate"):
    pretrain.train_and_evaluate(cfg(steps=8), second, quiet=True)


def test_extend_is_validated():
  cfg = configs.pretrain_config("quickstart", "lost")
  cfg.train.extend = "linear"
  with pytest.raises(UserError, match=r"train.extend: unknown mode 'linear'.*Fix: use one of "
                     r"\('stretch', 'constant'\)"):
    configs.validate(cfg, "pretrain")
