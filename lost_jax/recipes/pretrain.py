"""The pre-training recipe: a Llama built from its config, packed text, next-token loss."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from lost_jax.data import text as data
from lost_jax.data import tokenizer, tokenizer_files
from lost_jax.training import accounting
from lost_jax.models.llama import Llama
from lost_jax.recipes import inputs
from lost_jax.recipes.lm import next_token_nll
from lost_jax.training import checkpoint, runtime
from lost_jax.training.state import Setup, make_setup as make_state_setup
from lost_jax.training.trainer import Recipe, Trainer


def loss(model, batch: dict, static=None):
  """Next-token NLL (sum, weight) of a text batch; pre-training has no static argument."""
  del static
  return next_token_nll(model, batch)


def recipe(cfg: ml_collections.ConfigDict) -> Recipe:
  """A fresh Llama of cfg.model (initialised on the mesh), every parameter trained."""
  return Recipe(
      name=cfg.name, model=lambda rngs: Llama(cfg.model, rngs=rngs), loss=loss,
      flops_per_token=accounting.train_flops_per_token(cfg.model, cfg.data.seq_len),
      header=(f"lost_jax pretrain {cfg.name} | "
              f"{accounting.count_params(cfg.model)['total'] / 1e6:.2f}M params"))


def make_setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
  """The recipe's state setup on `mesh` (for tools that compile the step themselves)."""
  r = recipe(cfg)
  return make_state_setup(r.model, r.loss, cfg.train, mesh,
                          moment_dtype=jnp.dtype(cfg.model.param_dtype))


def eval_batch_count(cfg: ml_collections.ConfigDict) -> int:
  """Eval batches per evaluation: train.eval_batches, capped by train.eval_tokens if set."""
  if cfg.train.eval_tokens:
    per_batch = cfg.train.batch_size * cfg.data.seq_len
    return max(1, min(cfg.train.eval_batches, math.ceil(cfg.train.eval_tokens / per_batch)))
  return cfg.train.eval_batches


def evaluation(cfg: ml_collections.FrozenConfigDict, tok, trainer: Trainer, rest, *,
               show: bool = True) -> Callable[[dict], dict]:
  """`state -> {eval_loss, eval_ppl, eval_tokens}` on the run's validation batches."""
  nproc, pidx = jax.process_count(), jax.process_index()
  eval_batches = data.make_eval_batches(cfg.data, tok, cfg.train.batch_size // nproc,
                                        eval_batch_count(cfg), process_index=pidx,
                                        process_count=nproc)

  def evaluate(state) -> dict:
    out = trainer.eval_loss(state["params"], rest, eval_batches, show=show)
    return {"eval_loss": out["eval_loss"], "eval_ppl": math.exp(min(out["eval_loss"], 50.0)),
            "eval_tokens": out["eval_tokens"]}

  return evaluate


def _tokenizer(cfg: ml_collections.FrozenConfigDict):
  tok = tokenizer.load_tokenizer(cfg.data, cfg.model.vocab_size)
  tokenizer.check_vocab(tok, cfg.model.vocab_size)
  return tok


def _fingerprint(cfg: ml_collections.FrozenConfigDict, vocab_size: int) -> dict:
  return {**checkpoint.model_fingerprint(cfg, vocab_size),
          "inputs": inputs.fingerprint(cfg, "pretrain")}


def _trainer(cfg: ml_collections.FrozenConfigDict, mesh: jax.sharding.Mesh) -> Trainer:
  return Trainer(recipe(cfg), cfg.train, mesh, moment_dtype=jnp.dtype(cfg.model.param_dtype))


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                       quiet: bool = False, stop_at: int | None = None, devices=None) -> dict:
  """Run (or resume) pre-training of `cfg` in `workdir`; return the final eval metrics.

  `stop_at` ends this invocation after that step (with a checkpoint), as a preemption would;
  re-running resumes exactly, also on another mesh or process count. `devices`: the mesh's
  (default: all).
  """
  cfg, mesh = runtime.start(cfg, "pretrain", devices)
  nproc, pidx = jax.process_count(), jax.process_index()
  workdir = runtime.claim_workdir(workdir, cfg.train.steps)
  tok = _tokenizer(cfg)
  # Data a run cannot use, and a tokenizer other than the run's, are refused before the
  # workdir is written.
  train_iter = data.make_train_iterator(cfg.data, tok, cfg.train.batch_size // nproc,
                                        seed=cfg.seed, process_index=pidx, process_count=nproc)
  chat_template = tokenizer_files.chat_template_of(cfg.data.tokenizer)
  if pidx == 0:
    tokenizer_files.check_run_tokenizer(workdir, tok, chat_template)
  run = runtime.open_workdir(workdir, cfg, _fingerprint(cfg, tok.vocab_size), mesh,
                             shared_data=data.global_batches(cfg.data))
  cfg = run.cfg
  if pidx == 0:
    tokenizer_files.record_run_tokenizer(run.path, tok, chat_template)
  trainer = _trainer(cfg, mesh)
  state, rest, start = trainer.init_or_restore(run.ckpt, train_iter, jax.random.key(cfg.seed))
  return trainer.fit(state, rest, start, train_iter, run,
                     evaluation(cfg, tok, trainer, rest, show=not quiet), quiet=quiet,
                     stop_at=stop_at)


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                        *, quiet: bool = False) -> dict:
  """{"step", eval_loss, eval_ppl, eval_tokens} of the run's checkpoint `step` (default: the
  newest) on its validation batches; reads the workdir only."""
  cfg, mesh = runtime.start(cfg, "pretrain")
  ckpt, step = runtime.open_checkpoint(workdir, cfg, step)
  tok = _tokenizer(cfg)
  trainer = _trainer(cfg, mesh)
  try:
    ckpt.check_compatible(_fingerprint(cfg, tok.vocab_size))   # the same data
    state, rest = trainer.restore(ckpt, step)
  finally:
    ckpt.close()
  return {"step": step, **evaluation(cfg, tok, trainer, rest, show=not quiet)(state)}
