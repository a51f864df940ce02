"""lost_jax.checkpoint: what a resumed run may and may not change."""

import pytest

from helpers import base_pretrain_config
from lost_jax import configs
from lost_jax.recipes import pretrain
from lost_jax.training import checkpoint


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
