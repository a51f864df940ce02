"""The pre-training recipe: a Llama from its config, text batches, next-token loss."""

from __future__ import annotations

import jax
import ml_collections

from lost_jax.training import checkpoint
from lost_jax.training.trainer import (eval_batch_count, evaluate, fit, init_or_restore, make_eval_step,
                                       make_setup, make_train_step, open_workdir, start_run,
                                       validate)
from lost_jax.data import text as data
from lost_jax.data import tokenizer
from lost_jax.measure import accounting


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                       quiet: bool = False, stop_at: int | None = None) -> dict:
  """Run (or resume) pre-training of `cfg` in `workdir`; return the final eval metrics.

  `stop_at` ends this invocation after that step (with a checkpoint), as a preemption would;
  re-running resumes exactly.
  """
  cfg, mesh = start_run(cfg)
  validate(cfg)
  nproc, pidx = jax.process_count(), jax.process_index()
  local_batch = cfg.train.batch_size // nproc

  tok = tokenizer.load_tokenizer(cfg.data, cfg.model.vocab_size)
  tokenizer.check_vocab(tok, cfg.model.vocab_size)
  fingerprint = checkpoint.model_fingerprint(cfg, tok.vocab_size)
  ckpt = open_workdir(workdir, cfg, fingerprint)
  train_iter = data.make_train_iterator(cfg.data, tok, local_batch, seed=cfg.seed,
                                        process_index=pidx, process_count=nproc)
  eval_batches = data.make_eval_batches(cfg.data, tok, local_batch, eval_batch_count(cfg),
                                        process_index=pidx, process_count=nproc)

  setup = make_setup(cfg, mesh)
  state, rest, start = init_or_restore(setup, ckpt, train_iter, jax.random.key(cfg.seed))
  train_step = make_train_step(setup, cfg.train.microbatches)
  eval_step = make_eval_step(setup)
  header = (f"lost_jax pretrain {cfg.name} | "
            f"{accounting.count_params(cfg.model)['total'] / 1e6:.2f}M params")
  return fit(cfg.train, workdir, cfg.name, state=state, rest=rest, start=start,
             train_step=train_step, train_iter=train_iter, mesh=mesh, ckpt=ckpt,
             fingerprint=fingerprint,
             evaluate_fn=lambda st: evaluate(eval_step, st["params"], rest, eval_batches, mesh),
             flops_per_token=accounting.train_flops_per_token(cfg.model, cfg.data.seq_len),
             header=header, quiet=quiet, stop_at=stop_at)
