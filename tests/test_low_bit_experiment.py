"""experiments/low_bit.py: its pre-training and fine-tuning runs on a tiny model, a few steps."""

import json
import pytest
import math

from experiments import low_bit
from lost_jax.recipes import finetune, pretrain

TINY = {"model.d_model": 32, "model.ffn_dim": 64, "model.n_layers": 2, "model.n_heads": 2,
        "model.n_kv_heads": 2, "model.linear.rank": 4, "model.vocab_size": 512,
        "data.seq_len": 16, "train.batch_size": 2, "train.steps": 3, "train.eval_every": 3,
        "train.eval_batches": 1, "train.log_every": 1, "train.ckpt_every": 100,
        "train.precision": "float32"}
# log_every as the quickstart preset's (10): only the final step logs a loss, beside the eval.
TINY_FT = {"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 100,
           "train.batch_size": 2, "train.accuracy_examples": 2,
           "data.train_size": 32, "data.eval_size": 4, "sparse.ffn": "0.5@1",
           "sparse.attn": "0.5@1", "sparse.start_frac": 0.5}


@pytest.mark.slow
def test_low_bit_runs_report_and_reuse_cached_runs(tmp_path, monkeypatch):
  kw = dict(name="tiny_low_bit", workdir_root=str(tmp_path / "runs"), overrides=TINY,
            finetune_overrides=TINY_FT, out_dir=str(tmp_path / "docs"), command="python x",
            log=lambda _: None)
  s = low_bit.run("quickstart", **kw)
  assert set(s["pretrain"]) == set(low_bit.PRETRAIN)
  for name, r in s["pretrain"].items():
    assert math.isfinite(r["eval_loss"]) and sorted(r["losses"]) == [1, 2, 3], name
    stored = json.load(open(tmp_path / "runs" / "tiny_low_bit" / r["key"] / (r["key"] + ".json")))
    assert stored["config"]["train"]["optimizer"] == low_bit.PRETRAIN[name][1]
  # 8-bit states change the trajectory after the first update, but only slightly.
  for method in ("full_rank", "lost"):
    a, b = s["pretrain"][method + " 8-bit"]["losses"], s["pretrain"][method]["losses"]
    assert a[1] == b[1] and a[3] != b[3] and abs(a[3] / b[3] - 1) < 0.05, (a, b)
  ft = s["finetune"]
  assert set(ft) == set(low_bit.FINETUNE)
  assert all(sorted(int(k) for k in r["losses"]) == [2] for r in ft.values())
  assert ft["base NF4"]["eval_loss"] != ft["base as trained"]["eval_loss"]   # NF4 is applied
  md = (tmp_path / "docs" / "tiny_low_bit.md").read_text()
  assert "python x" in md and s["code_version"]["sources"] in md
  assert md.count("| full_rank |") == 1 and md.count("| lost |") == 1
  assert (tmp_path / "docs" / "tiny_low_bit.png").stat().st_size > 0

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(pretrain, "train_and_evaluate", no_training)
  monkeypatch.setattr(finetune, "finetune_and_evaluate", no_training)
  again = low_bit.run("quickstart", **kw)
  assert again["pretrain"]["lost 8-bit"]["eval_loss"] == s["pretrain"]["lost 8-bit"]["eval_loss"]
  assert again["finetune"]["base NF4"]["eval_loss"] == ft["base NF4"]["eval_loss"]
