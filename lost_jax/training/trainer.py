"""Pre-training: state init on a mesh, the jitted train/eval steps, and the training loop."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lost_jax import configs
from lost_jax.training import checkpoint
from lost_jax.ops import losses
from lost_jax.training import metrics
from lost_jax.training import optim
from lost_jax.parallel import sharding
from lost_jax.errors import TrainingDiverged, UserError
from lost_jax.models.llama import Llama
from lost_jax.parallel.distributed import initialize_distributed
from lost_jax.training.runtime import _StopFlag, make_workdir

PRECISIONS = configs.PRECISIONS   # train.precision -> (compute dtype, parameter dtype)
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def apply_precision(cfg: ml_collections.ConfigDict) -> None:
  """train.precision is the one switch for dtypes: it sets model.dtype and model.param_dtype."""
  if cfg.train.precision not in PRECISIONS:
    raise UserError(f"config.train.precision={cfg.train.precision!r} is unknown. "
                    f"Fix: use one of {tuple(PRECISIONS)}.")
  cfg.model.dtype, cfg.model.param_dtype = PRECISIONS[cfg.train.precision]


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every config check that can run before data is read or anything is compiled."""
  configs.validate_pretrain(cfg)


@dataclasses.dataclass
class Setup:
  """Everything static about a run: model graph, optimizer, mesh and shardings."""
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  state_shardings: Any
  rest_shardings: Any
  abstract_state: Any
  abstract_rest: Any
  init_fn: Callable


def make_setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  """Build the model abstractly, derive shardings, and a jitted init that materialises it."""
  abstract_model = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
  moment_dtype = jnp.dtype(cfg.model.param_dtype)
  notes: list[str] = []
  param_shardings = nnx.as_pure(sharding.state_shardings(abs_params, mesh, notes))
  tx = optim.make_optimizer(cfg.train, nnx.as_pure(abs_params), moment_dtype=moment_dtype,
                            param_shardings=param_shardings)
  schedule = optim.lr_schedule(cfg.train)

  def init(key):
    model = Llama(cfg.model, rngs=nnx.Rngs(params=key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.fold_in(key, 1)}
    return state, nnx.as_pure(rest)

  abstract_state, abstract_rest = jax.eval_shape(init, jax.random.key(0))
  repl = sharding.replicated(mesh)
  opt_shardings = sharding.opt_state_shardings(abstract_state["opt_state"], param_shardings,
                                               abstract_state["params"], mesh, notes)
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings,
                     "step": repl, "rng": repl}
  rest_shardings = nnx.as_pure(sharding.state_shardings(abs_rest, mesh, notes))
  sharding.warn_unsharded(notes)
  init_fn = jax.jit(init, out_shardings=(state_shardings, rest_shardings))
  return Setup(graphdef, tx, schedule, mesh, state_shardings, rest_shardings, abstract_state,
               abstract_rest, init_fn)


def batch_nll(graphdef, params, rest, batch, dense_len: int | None = None):
  """Summed token NLL of a batch and its weight sum (float32 scalars).

  `dense_len` (static) is passed to SparseLoRA models (`sparselora.StepLengths`: dense and
  logits suffixes). A model may return logits of the last positions only (every position
  with a loss): targets and weights are cut to match. With model.perf.loss_chunk > 0 the LM
  head and the loss are fused (`losses.fused_cross_entropy`): no [tokens, vocab] logits.
  """
  model = nnx.merge(graphdef, params, rest)
  perf = model.cfg.perf
  chunk = perf.get("loss_chunk", 0)
  lengths = () if dense_len is None else (dense_len,)
  out = model(batch["inputs"], *lengths, batch["positions"], batch["segment_ids"],
              head=not chunk)
  n = out.shape[1]
  targets, weights = batch["targets"][:, -n:], batch["weights"][:, -n:]
  if not chunk:
    return optim.cross_entropy(out, targets, weights)
  return losses.fused_cross_entropy(out, model.lm_head.kernel[...], targets, weights,
                                    chunk=chunk, vocab_chunk=perf.get("loss_vocab_chunk", 0),
                                    dtype=out.dtype, backward=perf.matmul_backward)


def make_train_step(setup: Setup, microbatches: int):
  """(state, rest, batch[, dense_len]) -> (state, metrics), jitted with donated state.

  The optional static `dense_len` (SparseLoRA) compiles one step per dense-suffix bucket.
  """
  graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule

  def grads_of(params, rest, batch, dense_len):
    if microbatches == 1:
      (nll, weight), grads = jax.value_and_grad(
          lambda p: batch_nll(graphdef, p, rest, batch, dense_len), has_aux=True)(params)
      return grads, nll, weight
    # Gradient accumulation: equal token weighting across micro-batches. Micro-batch j takes
    # rows j, j + mb, j + 2 mb, ...: [B] -> [B/mb, mb] keeps the batch sharding on the row
    # axis, so every device scans over its own rows and no device gathers the batch.
    split = jax.tree.map(lambda x: sharding.constrain_batch(
        x.reshape(-1, microbatches, *x.shape[1:])), batch)
    split = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), split)

    def body(carry, mb):
      mb = jax.tree.map(sharding.constrain_batch, mb)
      g_acc, nll_acc, w_acc = carry
      (nll, weight), g = jax.value_and_grad(
          lambda p: batch_nll(graphdef, p, rest, mb, dense_len), has_aux=True)(params)
      return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, w_acc + weight), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, nll, weight), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), split)
    return grads, nll, weight

  def step_fn(state, rest, batch, dense_len=None):
    params = state["params"]
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):   # activation constraints
      grads, nll, weight = grads_of(params, rest, batch, dense_len)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    loss, grad_norm = nll / denom, optax.tree.norm(grads)
    # A step with a non-finite loss or gradient is not applied: parameters and optimizer state
    # stay exactly as they were (the loop counts such steps and stops after too many). A cond,
    # not a select of new and old: the update can then overwrite the donated state in place
    # (a select keeps the old state alive beside the new one).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(params, opt_state, grads, grad_norm):
      # The clip reuses grad_norm (optim.clip_by_global_norm): no second pass over the grads.
      updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state

    new_params, opt_state = jax.lax.cond(finite, apply, lambda p, o, *_: (p, o), params,
                                         state["opt_state"], grads, grad_norm)
    new_state = {"params": new_params, "opt_state": opt_state,
                 "step": state["step"] + 1,
                 "rng": jax.random.fold_in(state["rng"], state["step"])}
    out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
           "tokens": weight, "skipped": ~finite}
    return new_state, out

  return jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.rest_shardings,
                                        sharding.batch_sharding(setup.mesh)),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,), static_argnums=(3,))


def make_eval_step(setup: Setup):
  """(params, rest, batch[, dense_len]) -> (nll sum, weight sum)."""
  def eval_fn(params, rest, batch, dense_len=None):
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
      return batch_nll(setup.graphdef, params, rest, batch, dense_len)
  return jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], setup.rest_shardings,
                                        sharding.batch_sharding(setup.mesh)),
                 static_argnums=(3,))


def to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Place this process's part of a batch on the mesh as global arrays."""
  shard = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(shard, np.asarray(batch[k]))
          for k in BATCH_KEYS}


def evaluate(eval_step, params, rest, batches, mesh) -> dict:
  """Exact token-weighted mean NLL and perplexity over the eval batches."""
  nll, weight = 0.0, 0.0
  for batch in batches:
    n, w = eval_step(params, rest, to_global(batch, mesh))
    nll, weight = nll + float(n), weight + float(w)
  loss = nll / max(weight, 1.0)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": weight}


def start_run(cfg: ml_collections.ConfigDict):
  """A private copy of the config with dtypes resolved, and the mesh (multi-host if asked)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  apply_precision(cfg)
  if cfg.mesh.distributed:
    initialize_distributed(cfg.mesh)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.train.microbatches)
  return cfg, mesh


def open_workdir(workdir: str, cfg: ml_collections.ConfigDict,
                 fingerprint: dict) -> checkpoint.Checkpointer:
  """Check the workdir's checkpoints fit this config, then record the resolved config."""
  make_workdir(workdir)
  ckpt = checkpoint.Checkpointer(workdir, every=cfg.train.ckpt_every,
                                 keep=cfg.train.keep_checkpoints)
  ckpt.check_compatible(fingerprint)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  return ckpt


def init_or_restore(setup: Setup, ckpt: checkpoint.Checkpointer, train_iter, key):
  """Fresh sharded state at step 0, or the newest intact checkpoint (iterator set in place)."""
  found = ckpt.restore_latest(
      checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings),
      checkpoint.abstract_with_shardings(setup.abstract_rest, setup.rest_shardings),
      train_iter)
  if found is None:
    state, rest = setup.init_fn(key)
    return state, rest, 0
  start, state, rest = found
  return state, rest, start


def fit(train_cfg: ml_collections.ConfigDict, workdir: str, name: str, *, state, rest,
        start: int, train_step, train_iter, mesh, ckpt: checkpoint.Checkpointer,
        fingerprint: dict, evaluate_fn: Callable[[Any], dict], flops_per_token: float,
        header: str = "", quiet: bool = False, stop_at: int | None = None,
        to_device: Callable | None = None, save_rest: bool = True) -> dict:
  """The training loop shared by pre-training and fine-tuning.

  Logs every `log_every` steps (reading step N's metrics after step N+1 is dispatched),
  evaluates every `eval_every` steps and at the end, checkpoints every `ckpt_every` steps and
  always at the last step reached (also on SIGTERM/SIGINT). `save_rest=False` leaves the
  frozen `rest` out of checkpoints (a fine-tune rebuilds its base model from its source).
  """
  pidx = jax.process_index()
  to_device = to_device or (lambda b: to_global(b, mesh))
  writer = metrics.MetricWriter(workdir, enabled=pidx == 0)
  progress = metrics.Progress(train_cfg.steps, start, enabled=not quiet and pidx == 0)
  log = progress.log if not quiet and pidx == 0 else (lambda _: None)
  n_dev = len(mesh.devices.flat)
  end = train_cfg.steps if stop_at is None else min(stop_at, train_cfg.steps)
  log(f"{header} | mesh {dict(mesh.shape)} | steps {start}->{end} of {train_cfg.steps} | "
      f"workdir {workdir}")
  logger = _StepLogger(train_cfg, writer, log, progress, flops_per_token, n_dev)
  max_skipped = train_cfg.get("max_skipped_steps", 10)
  saved_rest = rest if save_rest else None
  last_eval: dict = {}
  pending = None          # (step, device metrics): read one step late
  step = start
  with _StopFlag() as stop:
    while step < end and not stop.reached(step):
      batch = to_device(next(train_iter))
      state, step_metrics = train_step(state, rest, batch)
      step += 1
      if pending is not None:
        logger(*pending)
      pending = (step, step_metrics)
      if step % train_cfg.ckpt_every == 0:   # a checkpoint step: read its metrics now
        logger(*pending)
        pending = None
      if logger.streak >= max_skipped:
        break
      if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
        last_eval = evaluate_fn(state)
        writer.write(step, last_eval)
        log(f"eval step {step}: " + " | ".join(_fmt(k, v) for k, v in last_eval.items()))
      if step % train_cfg.ckpt_every == 0 and logger.streak == 0:
        _save_finite(ckpt, step, state, saved_rest, train_iter, fingerprint)
    if pending is not None:
      logger(*pending)
    diverged = logger.streak >= max_skipped
    if not diverged and ckpt.latest_step() != step:
      _save_finite(ckpt, step, state, saved_rest, train_iter, fingerprint, force=True)
  ckpt.wait()
  last_good = ckpt.latest_step()
  ckpt.close()
  progress.close()
  writer.close()
  if diverged:
    where = (f"step {last_good} ({os.path.join(ckpt.directory, str(last_good))})"
             if last_good is not None else "none (re-running starts from step 0)")
    raise TrainingDiverged(
        f"training diverged: steps {step - logger.streak + 1}..{step} had a non-finite loss "
        f"or gradient norm ({logger.streak} in a row, config.train.max_skipped_steps="
        f"{max_skipped}); they were skipped and nothing after them was saved. Last good "
        f"checkpoint: {where}. Fix: re-run the command with a lower config.train.lr to resume "
        "from it (or start a new --workdir with config.train.clip_norm > 0).")
  if pidx == 0:
    _plot_run(workdir, name)
  return {"step": step, **last_eval}


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (one replicated bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _save_finite(ckpt: checkpoint.Checkpointer, step: int, state, rest, train_iter,
                 fingerprint: dict, force: bool = False) -> None:
  """Save, unless parameters or optimizer state hold a NaN/Inf (never written to disk)."""
  if not bool(_all_finite((state["params"], state["opt_state"]))):
    ckpt.wait()
    last = ckpt.latest_step()
    raise TrainingDiverged(
        f"training diverged: the state after step {step} holds NaN or Inf values and was not "
        f"saved. Last good checkpoint: step {last}. Fix: re-run the command with a lower "
        "config.train.lr to resume from it.")
  ckpt.save(step, state, rest, train_iter, fingerprint, force=force)


_LABELS = {"eval_loss": "loss", "eval_ppl": "perplexity", "eval_tokens": "tokens",
           "eval_accuracy": "exact-match accuracy"}


def _fmt(key: str, value) -> str:
  label = _LABELS.get(key, key)
  if key.endswith("tokens"):
    return f"{label} {int(value)}"
  return f"{label} {value:.4f}" if isinstance(value, float) else f"{label} {value}"


def eval_batch_count(cfg) -> int:
  """Held-out batches per evaluation: train.eval_batches, capped by train.eval_tokens."""
  if cfg.train.eval_tokens:
    per_batch = cfg.train.batch_size * cfg.data.seq_len
    return max(1, min(cfg.train.eval_batches, math.ceil(cfg.train.eval_tokens / per_batch)))
  return cfg.train.eval_batches


class _StepLogger:
  """Turns one step's device metrics into a log line, metrics.jsonl row and TB scalars."""

  def __init__(self, train_cfg, writer, log, progress, flops_per_token, n_dev):
    self.cfg, self.writer, self.log, self.progress = train_cfg, writer, log, progress
    self.flops_per_token, self.n_dev = flops_per_token, n_dev
    self.window_t, self.window_tokens, self.window_steps = time.time(), 0.0, 0
    self.streak, self.skipped = 0, 0    # consecutive and total non-finite (skipped) steps

  def __call__(self, step: int, dev_metrics) -> None:
    m = jax.device_get(dev_metrics)
    self.window_tokens += float(m["tokens"])
    self.window_steps += 1
    self.progress.update(step)
    if m.get("skipped", False):
      self.streak += 1
      self.skipped += 1
      self.log(f"step {step}: loss {float(m['loss']):.4g}, grad norm "
               f"{float(m['grad_norm']):.4g}: not finite, update skipped ({self.streak} in a "
               f"row, {self.skipped} in all)")
    else:
      self.streak = 0
    if step % self.cfg.log_every and step != self.cfg.steps:
      return
    now = time.time()
    elapsed = max(now - self.window_t, 1e-9)
    tok_s = self.window_tokens / elapsed
    scalars = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens_per_s": tok_s, "step_time": elapsed / self.window_steps}
    if self.skipped:
      scalars["skipped_steps"] = self.skipped
    if self.cfg.peak_flops > 0:
      scalars["mfu"] = tok_s * self.flops_per_token / (self.cfg.peak_flops * self.n_dev)
    self.writer.write(step, scalars)
    mfu = f" | mfu {scalars['mfu']:.1%}" if "mfu" in scalars else ""
    mfu += f" | skipped {self.skipped}" if self.skipped else ""
    self.log(f"step {step}/{self.cfg.steps} | loss {float(m['loss']):.4f} | "
             f"lr {float(m['lr']):.2e} | gnorm {float(m['grad_norm']):.3f} | "
             f"{tok_s:,.0f} tok/s | {scalars['step_time'] * 1e3:.0f} ms/step{mfu} | "
             f"ETA {self.progress.eta(step, self.cfg.steps)}")
    self.window_t, self.window_tokens, self.window_steps = now, 0.0, 0


def _plot_run(workdir: str, name: str) -> None:
  rows = metrics.read_metrics(workdir)
  if any("eval_ppl" in r for r in rows):
    metrics.plot_curves({name: rows}, "eval_ppl", os.path.join(workdir, "eval_ppl.png"),
                        ylabel="validation perplexity", title=name, logy=True)
  if any("loss" in r for r in rows):
    metrics.plot_curves({name: rows}, "loss", os.path.join(workdir, "train_loss.png"),
                        ylabel="train loss", title=name)
