"""experiments/sparselora_accuracy.py: an interrupted fine-tune is never stored as a result."""

import pytest

from experiments import runs, sparselora_accuracy
from lost_jax import configs


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
  stored = {"eval_accuracy": 0.5, "eval_loss": 0.1, "steps": 3}
  runs.write_json(str(tmp_path / "result.json"), stored)
  monkeypatch.setattr(sparselora_accuracy.finetune, "finetune_and_evaluate",
                      lambda *a, **k: pytest.fail("trained again"))
  assert sparselora_accuracy.one_run(configs.finetune_config("quickstart"),
                                     str(tmp_path)) == stored
