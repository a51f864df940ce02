"""lost_jax.checkpoint: what a resumed run may and may not change."""

import pytest

from lost_jax import configs
from lost_jax.training import checkpoint
from lost_jax.recipes import pretrain
from test_pipeline import small_run_config


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


def test_resume_refuses_a_new_global_batch_and_accepts_a_new_step_count(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  pretrain.train_and_evaluate(small_run_config(steps=2), workdir, quiet=True)
  bigger = small_run_config(steps=2)
  bigger.train.batch_size = 8
  with pytest.raises(ValueError, match="global_batch: checkpoint 4 vs run 8"):
    pretrain.train_and_evaluate(bigger, workdir, quiet=True)
  longer = small_run_config(steps=4)
  assert pretrain.train_and_evaluate(longer, workdir, quiet=True)["step"] == 4
  assert "schedule.steps: checkpoint 2 vs run 4" in capsys.readouterr().out
