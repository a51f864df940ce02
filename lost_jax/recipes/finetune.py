"""LoRA / SparseLoRA fine-tuning: base model loading, the sparse train step, eval with decoding.

Shares the pre-training machinery: optimizer (`optim`), mesh and sharding rules, the training
loop (`train.fit`: logging, eval cadence, Orbax checkpoints with the grain iterator, resume).
Only LoRA parameters are trained and checkpointed; the frozen base comes from `init.source`
and the SVD estimators are cached in `<workdir>/estimators.npz`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lost_jax import configs
from lost_jax.measure import accounting
from lost_jax.training import checkpoint
from lost_jax.data import instruct
from lost_jax.training import metrics
from lost_jax.training import optim
from lost_jax.parallel import sharding
from lost_jax.adapters.sparselora import model as sparselora
from lost_jax.data import tokenizer
from lost_jax.training import trainer as train
from lost_jax.errors import UserError
from lost_jax.models.generate import greedy_generate
from lost_jax.adapters.lora import LoRAParam, apply_lora, quantize_base
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora import estimator as sl_estimator
from lost_jax.parallel import distributed
from lost_jax.training import runtime
from lost_jax.formats.base import base_kind, load_base


def sparse_model(cfg: ml_collections.ConfigDict, workdir: str | None,
                 mesh: jax.sharding.Mesh | None = None):
  """Base + LoRA adapters + (cached in workdir, if one is given) estimators wrapped as a
  SparseLoRALlama."""
  model = load_base(cfg, mesh)
  configs.validate_finetune(cfg, cfg.model.n_layers)   # ranks and layers against the base
  # Before the adapters and the estimators: those are built from the dequantised NF4 kernels,
  # the base the forward actually computes with (and that load_estimators checks against).
  quantize_base(model, cfg.init.get("quantize", "none"))
  plan = sl_plan.plan_from_config(cfg.sparse, cfg.model.n_layers)
  targets = tuple(t.strip() for t in cfg.lora.targets.split(",") if t.strip())
  apply_lora(model, targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
             dropout=cfg.lora.dropout, param_dtype=train.PRECISIONS[cfg.train.precision][1],
             rngs=nnx.Rngs(cfg.seed + 1))
  layers = plan.estimator_layers()
  estimators = None
  if layers:
    path = os.path.join(workdir, "estimators.npz") if workdir else None
    if path and os.path.exists(path):
      estimators = sl_estimator.load_estimators(path, model, cfg.sparse.estimator_rank)
    else:
      estimators = sl_estimator.build_estimators(model, cfg.sparse.estimator_rank, layers)
      if path and jax.process_index() == 0:
        sl_estimator.save_estimators(path, estimators)
  return sparselora.SparseLoRALlama(model, estimators, plan), plan


def lora_setup(module: nnx.Module, cfg, mesh) -> tuple[train.Setup, dict, dict]:
  """Setup + state for training only the LoRAParam variables of `module`."""
  setup, params, rest = abstract_lora_setup(module, cfg, mesh)
  return (setup, jax.device_put(params, setup.state_shardings["params"]),
          jax.device_put(rest, setup.rest_shardings))


def abstract_lora_setup(module: nnx.Module, cfg, mesh) -> tuple[train.Setup, dict, dict]:
  """Setup for training only the LoRAParam variables of `module` (which may be abstract,
  from nnx.eval_shape), with its LoRA parameters and frozen rest as pure trees, not placed."""
  graphdef, lora_state, rest_state = nnx.split(module, LoRAParam, ...)
  params = nnx.as_pure(lora_state)
  moment_dtype = jnp.dtype(cfg.model.param_dtype)
  tx = optim.make_optimizer(cfg.train, params, moment_dtype=moment_dtype)
  repl = sharding.replicated(mesh)
  notes: list[str] = []
  param_sh = nnx.as_pure(sharding.state_shardings(lora_state, mesh, notes))
  rest_sh = nnx.as_pure(sharding.state_shardings(rest_state, mesh, notes))
  abstract_opt = jax.eval_shape(tx.init, params)
  state_sh = {"params": param_sh,
              "opt_state": sharding.opt_state_shardings(abstract_opt, param_sh, params, mesh,
                                                        notes),
              "step": repl, "rng": repl}
  sharding.warn_unsharded(notes)

  def init(params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(cfg.seed)}

  init_fn = jax.jit(init, out_shardings=state_sh)
  abstract_state = jax.eval_shape(init, params)
  setup = train.Setup(graphdef, tx, optim.lr_schedule(cfg.train), mesh, state_sh, rest_sh,
                      abstract_state, None, init_fn)
  return setup, params, nnx.as_pure(rest_state)


@dataclasses.dataclass
class _SparseSchedule:
  """Host-side choice of each step's static lengths (sl_plan.StepLengths)."""
  seq_len: int
  bucket: int
  start_step: int
  enabled: bool
  dense_outputs: bool = True

  def dense_len(self, weights_BxL: np.ndarray, step: int) -> sl_plan.StepLengths:
    # Before start_step (or without sparsity) every token is dense: no estimator runs.
    sparse = self.enabled and step >= self.start_step
    local = sl_plan.step_lengths(weights_BxL, self.bucket, sparse)
    if sparse and not self.dense_outputs:   # ablation: output tokens sparse too (but the last)
      local = local._replace(dense_len=1)
    # Every process must compile the same step: the longest suffixes any process needs.
    return sl_plan.StepLengths(*distributed.agree_max(local))


def finetune_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                          quiet: bool = False, stop_at: int | None = None,
                          evaluate_only: bool = False) -> dict:
  """Run (or resume) LoRA / SparseLoRA fine-tuning of `cfg` in `workdir`.

  evaluate_only: evaluate the finished run's final checkpoint (step train.steps) on the
  current eval data, without training or writing metrics (re-scoring a finished run).
  """
  cfg, mesh = train.start_run(cfg)
  nproc, pidx = jax.process_count(), jax.process_index()
  local_batch = cfg.train.batch_size // nproc
  configs.validate_finetune(cfg)
  runtime.make_workdir(workdir)

  module, plan = sparse_model(cfg, workdir, mesh)
  configs.validate_model(cfg.model)
  tok = _tokenizer(cfg)
  fingerprint = {**checkpoint.model_fingerprint(cfg, tok.vocab_size),
                 "lora": json.loads(cfg.lora.to_json()), "init": json.loads(cfg.init.to_json()),
                 "sparse": json.loads(cfg.sparse.to_json())}
  ckpt = train.open_workdir(workdir, cfg, fingerprint)
  train_iter = instruct.make_train_iterator(cfg.data, tok, local_batch, seed=cfg.seed,
                                            process_index=pidx, process_count=nproc)
  eval_batches = instruct.make_eval_batches(cfg.data, tok, local_batch, process_index=pidx,
                                            process_count=nproc)
  eval_records = instruct.task_records(cfg.data, "eval")[:cfg.train.accuracy_examples]

  setup, params, rest = lora_setup(module, cfg, mesh)
  found = ckpt.restore_latest(
      checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings), None,
      train_iter)
  if found is None:
    state, start = setup.init_fn(params), 0
  else:
    start, state, _ = found
  step_fn = train.make_train_step(setup, cfg.train.microbatches)
  eval_step = train.make_eval_step(setup)
  sched = _SparseSchedule(cfg.data.seq_len, cfg.sparse.bucket,
                          int(cfg.sparse.start_frac * cfg.train.steps),
                          bool(cfg.sparse.enabled and plan.estimator_layers()),
                          bool(cfg.sparse.get("dense_outputs", True)))
  counter = {"step": start}

  def to_device(batch):
    dense_len = sched.dense_len(batch["weights"], counter["step"])
    counter["step"] += 1
    return train.to_global(batch, mesh), dense_len

  def train_step(state, rest, batch_and_len):
    batch, dense_len = batch_and_len
    return step_fn(state, rest, batch, dense_len)

  def evaluate_fn(state):
    nll, weight = 0.0, 0.0
    for batch in eval_batches:
      dense_len = sched.dense_len(batch["weights"], sched.start_step)
      n, w = eval_step(state["params"], rest, train.to_global(batch, mesh), dense_len)
      nll, weight = nll + float(n), weight + float(w)
    out = {"eval_loss": nll / max(weight, 1.0), "eval_tokens": weight}
    if eval_records:
      out["eval_accuracy"] = accuracy(setup.graphdef, state["params"], rest, eval_records, tok,
                                      cfg.data.max_prompt_len, cfg.data.max_new_tokens,
                                      cfg.data.template, final_answer=cfg.data.task == "gsm")
    return out

  if evaluate_only and cfg.train.steps:
    if start != cfg.train.steps:
      raise UserError(f"workdir {workdir} has no checkpoint of the final step "
                      f"{cfg.train.steps} to evaluate (latest: {start if found else 'none'}). "
                      "Fix: finish the run first (the same command without re-scoring).")
    return {"step": start, **evaluate_fn(state)}
  if cfg.train.steps == 0:   # zero-shot: LoRA's B starts at zero, so this is the base model
    result = {"step": 0, **evaluate_fn(state)}
    metrics.MetricWriter(workdir, enabled=pidx == 0).write(0, result)
    return result
  n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  sparse_layers = len(plan.estimator_layers()) if sched.enabled else 0
  header = (f"lost_jax finetune {cfg.name} | {n_lora / 1e6:.3f}M LoRA params | "
            f"{sparse_layers} sparse layers from step {sched.start_step}")
  return train.fit(cfg.train, workdir, cfg.name, state=state, rest=rest, start=start,
                   train_step=train_step, train_iter=train_iter, mesh=mesh, ckpt=ckpt,
                   fingerprint=fingerprint, evaluate_fn=evaluate_fn,
                   flops_per_token=accounting.train_flops_per_token(cfg.model,
                                                                    cfg.data.seq_len),
                   header=header, quiet=quiet, stop_at=stop_at, to_device=to_device,
                   save_rest=False)


def accuracy(graphdef, params, rest, records, tok, prompt_len: int, max_new: int,
             template: str = "alpaca", batch_size: int = 32,
             final_answer: bool = False) -> float:
  """Exact-match accuracy of greedy (KV-cache) answers of the adapted model."""
  model = nnx.merge(graphdef, params, rest).model
  generated = []
  for i in range(0, len(records), batch_size):
    chunk = records[i:i + batch_size]
    ids, mask = instruct.prompt_batch(chunk, tok, prompt_len, template)
    generated.append(np.asarray(greedy_generate(model, jnp.asarray(ids), jnp.asarray(mask),
                                                max_new_tokens=max_new)))
  return instruct.exact_match(np.concatenate(generated), records, tok, final_answer)


def _tokenizer(cfg) -> tokenizer.Tokenizer:
  """data.tokenizer if set; else the base's own: a HF directory's tokenizer.json or
  tokenizer.model, a GGUF file's metadata, a pre-training workdir's setting. A real base is
  never paired with an invented tokenizer."""
  if not cfg.data.tokenizer:
    kind = base_kind(cfg)
    if kind == "hf":
      found = [f for f in (tokenizer.TOKENIZER_JSON, tokenizer.SENTENCEPIECE_MODEL)
               if os.path.exists(os.path.join(cfg.init.path, f))]
      if not found:
        raise UserError(f"config.init.path={cfg.init.path!r} has neither "
                        f"{tokenizer.TOKENIZER_JSON} nor {tokenizer.SENTENCEPIECE_MODEL}. Fix: "
                        "set config.data.tokenizer to the base model's tokenizer file.")
      cfg.data.tokenizer = os.path.join(cfg.init.path, found[0])
    elif kind == "gguf":
      cfg.data.tokenizer = cfg.init.path
    elif kind == "pretrain":
      with open(os.path.join(cfg.init.path, "config.json")) as f:
        cfg.data.tokenizer = json.load(f)["data"]["tokenizer"]
  return tokenizer.load_tokenizer(cfg.data, cfg.model.vocab_size)
