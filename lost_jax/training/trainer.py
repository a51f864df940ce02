"""One trainer for every recipe: setup on a mesh, the jitted steps, eval, checkpoints, logging.

A `Recipe` says what is trained: the model, which of its variables train, the loss, and an
optional host-side static argument per batch. The trainer knows nothing of any one recipe:
pre-training (`lost_jax.recipes.pretrain`) and LoRA / SparseLoRA fine-tuning
(`lost_jax.recipes.finetune`) are both recipes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lost_jax import progress
from lost_jax.errors import TrainingDiverged, UserError
from lost_jax.training import checkpoint, metrics, runtime
from lost_jax.training.runtime import RunDir, StopFlag
from lost_jax.training.state import Setup, make_setup, to_global
from lost_jax.training.steps import make_eval_step, make_train_step


def no_static(batch: dict, step: int | None) -> None:
  """The static argument of a recipe that has none (one compiled step)."""
  del batch, step


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What a training recipe hands the trainer.

  model: a builder `rngs -> nnx.Module` (initialised on the mesh) or a built module.
  loss: `(module, batch, static) -> (nll sum, weight sum)`, float32 scalars.
  trainable: the nnx filter of the trained variables (the rest stays frozen).
  static: `(host batch, step) -> hashable`: the step's static argument (`step` is None for
    evaluation). One step is compiled per distinct value.
  save_rest: checkpoint the frozen variables too (False: the recipe rebuilds them).
  """
  name: str
  model: Any
  loss: Callable
  trainable: Any = nnx.Param
  static: Callable[[dict, int | None], Hashable] = no_static
  save_rest: bool = True
  flops_per_token: float = 0.0     # model FLOPs per trained token (MFU in the logs)
  header: str = ""                 # the run's first log line


class Trainer:
  """A recipe's train state on a mesh, its compiled steps, and the training loop."""

  def __init__(self, recipe: Recipe, train_cfg: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, *, moment_dtype: Any = jnp.float32):
    self.recipe, self.cfg, self.mesh = recipe, train_cfg, mesh
    self.setup: Setup = make_setup(recipe.model, recipe.loss, train_cfg, mesh,
                                   trainable=recipe.trainable, moment_dtype=moment_dtype)
    self.train_step = make_train_step(self.setup, train_cfg.microbatches)
    self.eval_step = make_eval_step(self.setup)

  def init_or_restore(self, ckpt: checkpoint.Checkpointer, train_iter, key: jax.Array):
    """(state, rest, step): fresh sharded state at step 0, or the newest intact checkpoint
    (the data iterator's position is restored in place)."""
    setup = self.setup
    found = ckpt.restore_latest(
        checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings),
        checkpoint.abstract_with_shardings(setup.abstract_rest, setup.rest_shardings)
        if self.recipe.save_rest else None,
        train_iter)
    if found is None:
      state, rest = setup.init(key)
      return state, rest, 0
    start, state, rest = found
    if rest is None:      # the frozen variables were not saved: the recipe's module has them
      rest = setup.place_rest()
    return state, rest, start

  def restore(self, ckpt: checkpoint.Checkpointer, step: int):
    """(state, rest) of checkpoint `step` in the setup's shardings, for an evaluation (the
    data position is not read); one UserError when it cannot be restored."""
    setup = self.setup
    try:
      state, rest = ckpt.restore(
          step, checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings),
          checkpoint.abstract_with_shardings(setup.abstract_rest, setup.rest_shardings)
          if self.recipe.save_rest else None, None)
    except Exception as e:  # pylint: disable=broad-except  # any unreadable part
      raise UserError(f"checkpoint step {step} in {ckpt.directory} cannot be restored "
                      f"({checkpoint.failure_reason(e)}). Fix: pass an intact one with --step "
                      "(a damaged one is moved aside when the run resumes).") from e
    return state, (setup.place_rest() if rest is None else rest)

  def eval_loss(self, params, rest, batches, *, show: bool = True) -> dict:
    """Exact token-weighted mean loss over `batches` (host batches of this process); a
    progress bar of the batches when `show`."""
    nll, weight = 0.0, 0.0
    for batch in progress.track(batches, "eval loss", "batch", enabled=show, leave=False):
      static = self.recipe.static(batch, None)
      n, w = self.eval_step(params, rest, to_global(batch, self.mesh), static)
      nll, weight = nll + float(n), weight + float(w)
    return {"eval_loss": nll / max(weight, 1.0), "eval_tokens": weight}

  def fit(self, state, rest, start: int, train_iter, run: RunDir,
          evaluate: Callable[[Any], dict], *, quiet: bool = False,
          stop_at: int | None = None) -> dict:
    """Train from `start` to train.steps (or `stop_at`); return {"step", **last eval}.

    Logs every `log_every` steps (reading step N's metrics after step N+1 is dispatched),
    evaluates every `eval_every` steps and at the end, checkpoints every `ckpt_every` steps
    and always at the last step reached (also on SIGTERM/SIGINT). A run of non-finite steps
    (all skipped) longer than `max_skipped_steps` stops it without saving anything after them.
    """
    cfg, recipe, ckpt, mesh = self.cfg, self.recipe, run.ckpt, self.mesh
    pidx = jax.process_index()
    stop_flag = StopFlag()   # before any output: refuses to start after a Ctrl-C
    writer = metrics.MetricWriter(run.path, enabled=pidx == 0)
    progress = metrics.Progress(cfg.steps, start, enabled=not quiet and pidx == 0)
    log = progress.log if not quiet and pidx == 0 else (lambda _: None)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    log(f"{recipe.header} | mesh {dict(mesh.shape)} | steps {start}->{end} of {cfg.steps} | "
        f"workdir {run.path}")
    logger = metrics.StepLogger(cfg, writer, log, progress, recipe.flops_per_token,
                                len(mesh.devices.flat))
    max_skipped = cfg.get("max_skipped_steps", 10)
    saved_rest = rest if recipe.save_rest else None
    last_eval: dict = {}
    pending = None          # (step, device metrics): read one step late
    step = start
    try:
      with stop_flag as stop:
        while step < end and not stop.reached(step):
          host_batch = next(train_iter)
          static = recipe.static(host_batch, step)
          state, step_metrics = self.train_step(state, rest, to_global(host_batch, mesh), static)
          step += 1
          if pending is not None:
            logger(*pending)
          pending = (step, step_metrics)
          if step % cfg.ckpt_every == 0:   # a checkpoint step: read its metrics now
            logger(*pending)
            pending = None
          if logger.streak >= max_skipped:
            break
          if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = evaluate(state)
            writer.write(step, last_eval)
            log(f"eval step {step}: " + " | ".join(metrics.format_metric(k, v)
                                                    for k, v in last_eval.items()))
          if step % cfg.ckpt_every == 0 and logger.streak == 0:
            save_finite(ckpt, step, state, saved_rest, train_iter, run.fingerprint)
        if pending is not None:
          logger(*pending)
        diverged = logger.streak >= max_skipped
        if not diverged and ckpt.latest_step() != step:
          save_finite(ckpt, step, state, saved_rest, train_iter, run.fingerprint, force=True)
    except BaseException:
      # An error (a full disk, Ctrl-C in a multi-process run, a bug) ends the process: a
      # checkpoint still being written finishes first, so it is there to resume from.
      finish_saves(ckpt)
      raise
    ckpt.wait()
    last_good = ckpt.latest_step()
    ckpt.close()
    if hasattr(train_iter, "close"):   # data worker processes stop now, not at interpreter exit
      train_iter.close()
    progress.close()
    writer.close()
    runtime.unlock_workdir(run.path)
    if diverged:
      where = (f"step {last_good} ({os.path.join(ckpt.directory, str(last_good))})"
               if last_good is not None else "none (re-running starts from step 0)")
      raise TrainingDiverged(
          f"training diverged: steps {step - logger.streak + 1}..{step} had a non-finite loss "
          f"or gradient norm ({logger.streak} in a row, config.train.max_skipped_steps="
          f"{max_skipped}); they were skipped and nothing after them was saved. Last good "
          f"checkpoint: {where}. Fix: re-run the command with a lower config.train.lr to "
          "resume from it (or start a new --workdir with config.train.clip_norm > 0).")
    if pidx == 0:
      metrics.plot_run(run.path, recipe.name)
    return {"step": step, **last_eval}


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (one replicated bool).

  x - x is 0 where x is finite and NaN where x is +-Inf or NaN, so the sum of x - x over
  every leaf is 0 or NaN and never overflows. One float sum per leaf: a boolean reduction per
  leaf (jnp.all(jnp.isfinite(x))) compiles several times slower on XLA:CPU, which a
  checkpoint of a state with hundreds of leaves (LoRA on 30 layers) waited for.
  """
  sums = [jnp.sum(x - x, dtype=jnp.float32) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.isfinite(sum(sums)) if sums else jnp.array(True)


def finish_saves(ckpt: checkpoint.Checkpointer) -> None:
  """Wait for a checkpoint save in flight; its own failure is left to the error being raised."""
  try:
    ckpt.wait()
  except Exception:  # pylint: disable=broad-except
    pass


def save_finite(ckpt: checkpoint.Checkpointer, step: int, state, rest, train_iter,
                fingerprint: dict, force: bool = False) -> None:
  """Save, unless parameters or optimizer state hold a NaN/Inf (never written to disk)."""
  if not bool(all_finite((state["params"], state["opt_state"]))):
    ckpt.wait()
    last = ckpt.latest_step()
    raise TrainingDiverged(
        f"training diverged: the state after step {step} holds NaN or Inf values and was not "
        f"saved. Last good checkpoint: step {last}. Fix: re-run the command with a lower "
        "config.train.lr to resume from it.")
  ckpt.save(step, state, rest, train_iter, fingerprint, force=force)
