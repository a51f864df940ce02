"""`python -m lost_jax.main evaluate --workdir=RUN [--step=N]`: a run's eval metrics at its
newest (or step N's) checkpoint, with the run's own eval set and settings (its config.json).

`evaluate --config=configs/finetune.py:<preset> --config.init.path=BASE --workdir=OUT` scores
the base alone (no adapters: zero-shot) on the preset's eval set. `--forward=dense` computes a
SparseLoRA fine-tune's loss with every channel (as it is served, and as LoRA's is), not under
the sparse context it trained with. Both append the result to
`<workdir>/evaluations.jsonl`; the library call is `lost_jax.recipes.evaluate`.
"""

from __future__ import annotations

import os

from lost_jax import configs
from lost_jax.errors import UserError
from lost_jax.recipes import evaluate
from lost_jax.training import checkpoint


def main(flags) -> dict:
  """The eval metrics `done:` prints: {"step", ...} of a run, {"model", ...} of a base."""
  workdir, step = os.path.expanduser(flags.workdir), flags.step
  if step is not None and step < 0:
    raise UserError(f"--step={step} is negative. Fix: pass a saved checkpoint's step, or no "
                    "--step for the newest.")
  if flags["config"].present:
    cfg = flags.config
    if step is not None:
      raise UserError("--step picks a run's checkpoint, but --config evaluates a base model "
                      "alone. Fix: drop --step (or --config, to evaluate the run in --workdir).")
    if "lora" not in cfg:
      raise UserError("evaluate --config scores a fine-tune preset's base model, and this is "
                      "a pre-training config. Fix: pass --config=configs/finetune.py:<preset> "
                      "--config.init.path=BASE, or only --workdir=RUN to evaluate a run.")
    if checkpoint.saved_steps(workdir):
      raise UserError(f"--workdir={workdir} holds a run's checkpoints, and --config evaluates "
                      "a base model alone. Fix: drop --config to evaluate that run, or give a "
                      "new --workdir for the base's evaluation.")
    configs.validate(cfg, "finetune")
    return evaluate.evaluate_base(cfg, workdir, forward=flags.forward)
  return evaluate.evaluate_run(workdir, step, forward=flags.forward)
