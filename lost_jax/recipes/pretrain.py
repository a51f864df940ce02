"""The pre-training recipe: a Llama built from its config, packed text, next-token loss."""

from __future__ import annotations

import math

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


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                       quiet: bool = False, stop_at: int | None = None) -> dict:
  """Run (or resume) pre-training of `cfg` in `workdir`; return the final eval metrics.

  `stop_at` ends this invocation after that step (with a checkpoint), as a preemption would;
  re-running resumes exactly.
  """
  cfg, mesh = runtime.start(cfg, "pretrain")
  nproc, pidx = jax.process_count(), jax.process_index()
  local_batch = cfg.train.batch_size // nproc

  tok = tokenizer.load_tokenizer(cfg.data, cfg.model.vocab_size)
  tokenizer.check_vocab(tok, cfg.model.vocab_size)
  run = runtime.open_workdir(workdir, cfg, {**checkpoint.model_fingerprint(cfg, tok.vocab_size),
                                            "inputs": inputs.fingerprint(cfg, "pretrain")})
  if pidx == 0:
    tokenizer_files.record_run_tokenizer(run.path, tok,
                                         tokenizer_files.chat_template_of(cfg.data.tokenizer))
  train_iter = data.make_train_iterator(cfg.data, tok, local_batch, seed=cfg.seed,
                                        process_index=pidx, process_count=nproc)
  eval_batches = data.make_eval_batches(cfg.data, tok, local_batch, eval_batch_count(cfg),
                                        process_index=pidx, process_count=nproc)

  trainer = Trainer(recipe(cfg), cfg.train, mesh,
                    moment_dtype=jnp.dtype(cfg.model.param_dtype))
  state, rest, start = trainer.init_or_restore(run.ckpt, train_iter, jax.random.key(cfg.seed))

  def evaluate(state) -> dict:
    out = trainer.eval_loss(state["params"], rest, eval_batches)
    return {"eval_loss": out["eval_loss"], "eval_ppl": math.exp(min(out["eval_loss"], 50.0)),
            "eval_tokens": out["eval_tokens"]}

  return trainer.fit(state, rest, start, train_iter, run, evaluate, quiet=quiet,
                     stop_at=stop_at)
