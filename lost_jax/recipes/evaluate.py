"""Evaluation alone: a run's checkpoint, or a fine-tune preset's base with no adapters.

`evaluate_run(workdir, step)` reads the run's recorded config.json (so its own eval set and
settings), restores checkpoint `step` (default: the newest) and scores it as the run's end of
training did: perplexity and loss for pre-training, loss and exact-match accuracy for a
fine-tune. `evaluate_base(cfg, workdir)` scores a fine-tune preset's base zero-shot. Each
result is appended to `<workdir>/evaluations.jsonl`, never to the training metrics.
"""

from __future__ import annotations

import os

import ml_collections

from lost_jax.recipes import finetune, pretrain, saved_run
from lost_jax.training import metrics

ZERO_SHOT = finetune.ZERO_SHOT


def evaluate_run(workdir: str, step: int | None = None, *, quiet: bool = False,
                 forward: str = "trained") -> dict:
  """{"step", **eval metrics} of the run in `workdir` at checkpoint `step` (newest if None);
  a fine-tune's loss under `forward` (finetune.FORWARDS: trained | dense; a pre-training
  run's forward is dense either way)."""
  workdir = os.path.expanduser(workdir)
  cfg, command = saved_run.run_config(workdir)
  if command == "pretrain":
    out, labels = pretrain.evaluate_checkpoint(cfg, workdir, step, quiet=quiet), {}
  else:
    out = finetune.evaluate_checkpoint(cfg, workdir, step, quiet=quiet, forward=forward)
    labels = {"forward": forward}
  checkpoint = os.path.join(os.path.abspath(workdir), "checkpoints", str(out["step"]))
  metrics.append_evaluation(workdir, {"step": out["step"], "checkpoint": checkpoint,
                                      "recipe": command, **labels, **_floats(out, "step")})
  return out


def evaluate_base(cfg: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False,
                  forward: str = "trained") -> dict:
  """{"model": "base (zero-shot)", **eval metrics} of the fine-tune config's base alone, the
  loss under `forward` (as in evaluate_run)."""
  workdir = os.path.expanduser(workdir)
  out = finetune.evaluate_base(cfg, workdir, quiet=quiet, forward=forward)
  metrics.append_evaluation(workdir, {"model": ZERO_SHOT, "base": cfg.init.path or
                                      cfg.init.source, "recipe": "finetune",
                                      "forward": forward, **_floats(out)})
  return {"model": ZERO_SHOT, **out}


def _floats(out: dict, *drop: str) -> dict:
  return {k: float(v) for k, v in out.items() if k not in drop}
