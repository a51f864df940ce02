"""The LoRA / SparseLoRA fine-tuning recipe: a frozen base with adapters, instruction data.

The base comes from `init` (`recipes/base.py`), LoRA adapters are the only trained variables
(`LoRAParam`) and the only ones checkpointed; the frozen base is rebuilt from its source and
the estimators are cached in `<workdir>/estimators.npz`. SparseLoRA's per-step static
lengths (`sparselora.StepLengths`) are the recipe's static argument: the trainer compiles one
step per value without knowing what they mean.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lost_jax import configs, errors, files, progress
from lost_jax.adapters.lora import LoRAParam, apply_lora, quantize_base
from lost_jax.adapters.sparselora import estimator as sl_estimator
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora.model import SparseLoRALlama
from lost_jax.data import instruct, tokenizer, tokenizer_files
from lost_jax.errors import UserError
from lost_jax.training import accounting
from lost_jax.models.generate import greedy_generate
from lost_jax.parallel import distributed
from lost_jax.recipes.base import load_base, tokenizer_path
from lost_jax.recipes import inputs
from lost_jax.recipes.lm import next_token_nll
from lost_jax.training import checkpoint, metrics, optim, runtime
from lost_jax.training.state import Setup, make_setup as make_state_setup
from lost_jax.training.trainer import Recipe, Trainer


def base_model(cfg: ml_collections.FrozenConfigDict, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[nnx.Module, ml_collections.FrozenConfigDict]:
  """(the frozen base `cfg.init` names, quantised per init.quantize; the run config).

  The run config is `cfg` (resolved) with the base's model group and tokenizer path, checked
  against the base's shape, and sparse.ffn / attn read from sparse.plan (a plan file) if one
  is given: everything a checkpoint's fingerprint is made of, before any adapter or estimator.
  """
  cfg = configs.resolve(cfg, "finetune")
  model, model_cfg = load_base(cfg, mesh)
  cfg = configs.with_group(cfg, model=model_cfg,
                           data=dict(cfg.data.to_dict(), tokenizer=tokenizer_path(cfg)))
  cfg = with_plan_file(cfg)
  configs.validate_finetune_base(cfg)
  # Before the adapters and the estimators: those are built from the dequantised NF4 kernels,
  # the base the forward actually computes with (and that load_estimators checks against).
  quantize_base(model, cfg.init.get("quantize", "none"))
  return model, cfg


def adapt(model, cfg: ml_collections.FrozenConfigDict, tok, workdir: str | None, *,
          all_estimators: bool = False) -> tuple[SparseLoRALlama, sl_plan.SparsityPlan]:
  """(`model` with LoRA adapters and sparse.estimator estimators as a SparseLoRALlama, its
  plan).

  Estimators (of every layer if all_estimators, else of the plan's sparse layers; asvd's
  fitted on the calibration batches, read with `tok`) are cached in `workdir` if one is
  given: derived from the base and settings alone, rebuilt when the cache does not match.
  """
  plan = sl_plan.plan_from_config(cfg.sparse, cfg.model.n_layers)
  targets = tuple(t.strip() for t in cfg.lora.targets.split(",") if t.strip())
  apply_lora(model, targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
             dropout=cfg.lora.dropout, param_dtype=configs.PRECISIONS[cfg.train.precision][1],
             rngs=nnx.Rngs(cfg.seed + 1))
  layers = range(cfg.model.n_layers) if all_estimators else plan.estimator_layers()
  estimators = estimators_of(cfg, model, tok, layers, workdir) if layers else None
  return SparseLoRALlama(model, estimators, plan), plan


def adapted_model(cfg: ml_collections.FrozenConfigDict, workdir: str | None,
                  mesh: jax.sharding.Mesh | None = None, *, all_estimators: bool = False
                  ) -> tuple[SparseLoRALlama, sl_plan.SparsityPlan,
                             ml_collections.FrozenConfigDict]:
  """(base + LoRA adapters + estimators as a SparseLoRALlama, its plan, the run config):
  `adapted_and_tokenizer` without the tokenizer."""
  return adapted_and_tokenizer(cfg, workdir, mesh, all_estimators=all_estimators)[:3]


def calibration_inputs(cfg: ml_collections.FrozenConfigDict, tok
                       ) -> tuple[list[dict], list[sl_plan.StepLengths]]:
  """The first sparse.calibration_batches training batches (what the fine-tune starts on)
  and the static lengths a sparse step of each has: what `calibrate` measures and asvd
  estimators are fitted on."""
  sp = cfg.sparse
  it = instruct.make_train_iterator(cfg.data, tok, cfg.train.batch_size, seed=cfg.seed)
  batches = [next(it) for _ in range(sp.calibration_batches)]
  lengths = [sl_plan.step_lengths(b["weights"], sp.bucket, True) for b in batches]
  if not sp.dense_outputs:
    lengths = [n._replace(dense_len=1) for n in lengths]
  return [{k: jnp.asarray(v) for k, v in b.items()} for b in batches], lengths


def calibration_fingerprint(cfg: ml_collections.FrozenConfigDict) -> dict:
  """What the calibration batches and the tokens asvd's statistics read depend on."""
  sp = cfg.sparse
  return {"inputs": inputs.fingerprint(cfg, "finetune"),
          "data": json.loads(cfg.data.to_json()), "seed": cfg.seed,
          "batch_size": cfg.train.batch_size, "batches": sp.calibration_batches,
          "sparse": {k: sp.get(k) for k in ("bucket", "dense_outputs", "estimator_tokens")}}


def estimators_of(cfg: ml_collections.FrozenConfigDict, model, tok, layers,
                  workdir: str | None = None) -> dict:
  """The sparse.estimator estimators of `layers` (rank sparse.estimator_rank), from
  `<workdir>/estimators.npz` if it holds them, else built (and cached there)."""
  sp = cfg.sparse
  kind = sp.get("estimator", "svd")
  calibration = calibration_fingerprint(cfg) if kind == "asvd" else None
  path = os.path.join(workdir, "estimators.npz") if workdir else None
  est = _cached_estimators(path, model, sp.estimator_rank, kind, calibration)
  if est is not None and all(sl_estimator.layer_key(i) in est for i in layers):
    return est
  moments = None
  if kind == "asvd":
    batches, lengths = calibration_inputs(cfg, tok)
    masks = [sl_estimator.token_mask(b["segment_ids"], b["inputs"].shape[1] - n.dense_len,
                                     sp.estimator_tokens) for b, n in zip(batches, lengths)]
    moments = sl_estimator.input_moments(model, batches, masks, layers)
  est = sl_estimator.build_estimators(model, sp.estimator_rank, layers, kind=kind,
                                      moments=moments)
  if path and jax.process_index() == 0:
    sl_estimator.save_estimators(path, est, kind=kind, calibration=calibration, model=model)
  return est


def with_plan_file(cfg: ml_collections.FrozenConfigDict) -> ml_collections.FrozenConfigDict:
  """cfg with sparse.ffn / attn of the plan file sparse.plan names (checked against cfg.model
  and sparse.mode); cfg itself without one. The resolved strings enter the fingerprint."""
  path = cfg.sparse.get("plan", "")
  if not path:
    return cfg
  plan = sl_plan.read_plan_file(path, cfg.model)
  if plan.mode != cfg.sparse.mode:
    raise UserError(f"config.sparse.plan={path} was calibrated with sparse.mode={plan.mode!r}, "
                    f"the run has {cfg.sparse.mode!r}. Fix: --config.sparse.mode={plan.mode}, "
                    "or calibrate with the run's mode")
  return configs.with_group(cfg, sparse=dict(
      cfg.sparse.to_dict(), ffn=configs.format_layer_sparsity(plan.ffn),
      attn=configs.format_layer_sparsity(plan.attn)))


def _cached_estimators(path: str | None, model, rank: int, kind: str = "svd",
                       calibration: dict | None = None) -> dict | None:
  """The run's estimators.npz, or None (one line says why) when there is none or it does not
  hold this base's estimators: torn, not an estimator file, or built from another base,
  kind, rank or calibration data. They are derived from the base (and asvd's from the
  calibration batches) alone, so they are rebuilt; a checkpoint trained on another base or
  settings was refused before (its fingerprint records the base's files and settings)."""
  if not path or not os.path.exists(path):
    return None
  try:
    return sl_estimator.load_estimators(path, model, rank, kind=kind, calibration=calibration)
  except ValueError as e:   # DamagedFile, or the estimators of another base or settings
    if jax.process_index() == 0:
      what = errors.one_line(e).split(" Fix:")[0].rstrip(".")
      print(f"{what}; rebuilding it from the base", flush=True)
    return None


def loss(model, batch: dict, lengths: sl_plan.StepLengths):
  """Next-token NLL (sum, weight) of an instruction batch at the step's static lengths."""
  return next_token_nll(model, batch, lengths)


@dataclasses.dataclass
class SparseSchedule:
  """Host-side choice of each step's static lengths (sl_plan.StepLengths)."""
  seq_len: int
  bucket: int
  start_step: int
  enabled: bool
  dense_outputs: bool = True

  def lengths(self, weights_BxL: np.ndarray, step: int) -> sl_plan.StepLengths:
    # Before start_step (or without sparsity) every token is dense: no estimator runs.
    sparse = self.enabled and step >= self.start_step
    local = sl_plan.step_lengths(weights_BxL, self.bucket, sparse)
    if sparse and not self.dense_outputs:   # ablation: output tokens sparse too (but the last)
      local = local._replace(dense_len=1)
    # Every process must compile the same step: the longest suffixes any process needs.
    return sl_plan.StepLengths(*distributed.agree_max(local))


def schedule(cfg: ml_collections.ConfigDict, plan: sl_plan.SparsityPlan) -> SparseSchedule:
  """The run's SparseSchedule (sparsity from step start_frac * steps, if any layer is sparse)."""
  return SparseSchedule(cfg.data.seq_len, cfg.sparse.bucket,
                        int(cfg.sparse.start_frac * optim.schedule_steps(cfg.train)),
                        bool(cfg.sparse.enabled and plan.estimator_layers()),
                        bool(cfg.sparse.get("dense_outputs", True)))


def recipe(cfg: ml_collections.FrozenConfigDict, module: SparseLoRALlama,
           plan: sl_plan.SparsityPlan) -> Recipe:
  """Train the LoRA parameters of `module`; each batch's static lengths from the schedule."""
  sched = schedule(cfg, plan)
  n_lora = sum(int(np.prod(x.shape))
               for x in jax.tree.leaves(nnx.as_pure(nnx.state(module, LoRAParam))))
  sparse_layers = len(plan.estimator_layers()) if sched.enabled else 0
  return Recipe(
      name=cfg.name, model=module, loss=loss, trainable=LoRAParam,
      static=lambda batch, step: sched.lengths(
          batch["weights"], sched.start_step if step is None else step),
      save_rest=False,
      flops_per_token=accounting.train_flops_per_token(cfg.model, cfg.data.seq_len),
      header=(f"lost_jax finetune {cfg.name} | {n_lora / 1e6:.3f}M LoRA params | "
              f"{sparse_layers} sparse layers from step {sched.start_step}"))


def make_setup(cfg: ml_collections.FrozenConfigDict, module: SparseLoRALlama,
               plan: sl_plan.SparsityPlan, mesh: jax.sharding.Mesh) -> Setup:
  """The recipe's state setup on `mesh` for `module` (which may be abstract, from
  nnx.eval_shape), for tools that compile the step themselves."""
  r = recipe(cfg, module, plan)
  return make_state_setup(r.model, r.loss, cfg.train, mesh, trainable=r.trainable,
                          moment_dtype=jnp.dtype(cfg.model.param_dtype))


def abstract_setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   platform: str | None = None
                   ) -> tuple[Setup, ml_collections.FrozenConfigDict]:
  """(setup, run config) of the fine-tune on an abstract base (nnx.eval_shape: no weight is
  read or allocated), for compiling its step ahead of time for `platform`'s devices."""
  cfg = configs.resolve(cfg, "finetune", platform)
  built = {}

  def build():
    module, built["plan"], built["cfg"] = adapted_model(cfg, None)
    return module

  module = nnx.eval_shape(build)
  return make_setup(built["cfg"], module, built["plan"], mesh), built["cfg"]


EvalData = tuple[list, list]   # (loss batches of this process, records scored by accuracy)


def eval_data(cfg: ml_collections.FrozenConfigDict, tok) -> EvalData:
  """The run's held-out examples as loss batches of this process, and the first
  train.accuracy_examples of them for exact-match accuracy; prompts too long are counted in
  the log, or refused (data.truncate=refuse)."""
  nproc, pidx = jax.process_count(), jax.process_index()
  batches = instruct.make_eval_batches(cfg.data, tok, cfg.train.batch_size // nproc,
                                       process_index=pidx, process_count=nproc)
  return batches, instruct.task_records(cfg.data, "eval")[:cfg.train.accuracy_examples]


def evaluation(cfg: ml_collections.FrozenConfigDict, tok, trainer: Trainer, rest, *,
               show: bool = True, data: EvalData | None = None) -> Callable[[dict], dict]:
  """`state -> {eval_loss, eval_tokens, eval_accuracy}` on the run's held-out examples
  (`data`, default `eval_data`; accuracy by greedy decoding, if any records are scored)."""
  eval_batches, eval_records = data if data is not None else eval_data(cfg, tok)

  def evaluate(state) -> dict:
    out = trainer.eval_loss(state["params"], rest, eval_batches, show=show)
    if eval_records:
      out["eval_accuracy"] = accuracy(trainer.setup.graphdef, state["params"], rest,
                                      eval_records, tok, cfg.data.max_prompt_len,
                                      cfg.data.max_new_tokens, cfg.data.template,
                                      final_answer=cfg.data.task == "gsm", show=show)
    return out

  return evaluate


def base_and_tokenizer(cfg: ml_collections.FrozenConfigDict,
                       mesh: jax.sharding.Mesh | None = None):
  """(base model, run config, tokenizer): `base_model` and the base's tokenizer, with
  data.template `auto` decided once (a run records the template it trains with)."""
  model, cfg = base_model(cfg, mesh)
  tok = tokenizer.load_tokenizer(cfg.data, cfg.model.vocab_size)
  cfg = configs.with_group(cfg, data=dict(
      cfg.data.to_dict(), template=instruct.resolve_template(cfg.data.template, tok)))
  return model, cfg, tok


def adapted_and_tokenizer(cfg: ml_collections.FrozenConfigDict, workdir: str | None,
                          mesh: jax.sharding.Mesh | None = None, *, all_estimators: bool = False):
  """(module, plan, run config, tokenizer): `base_and_tokenizer`, then `adapt`."""
  model, cfg, tok = base_and_tokenizer(cfg, mesh)
  module, plan = adapt(model, cfg, tok, workdir, all_estimators=all_estimators)
  return module, plan, cfg, tok


def _fingerprint(cfg: ml_collections.FrozenConfigDict, vocab_size: int) -> dict:
  return {**checkpoint.model_fingerprint(cfg, vocab_size),
          "lora": json.loads(cfg.lora.to_json()), "init": json.loads(cfg.init.to_json()),
          "sparse": json.loads(cfg.sparse.to_json()),
          "inputs": inputs.fingerprint(cfg, "finetune")}


def _trainer(cfg: ml_collections.FrozenConfigDict, module: SparseLoRALlama,
             plan: sl_plan.SparsityPlan, mesh: jax.sharding.Mesh) -> Trainer:
  return Trainer(recipe(cfg, module, plan), cfg.train, mesh,
                 moment_dtype=jnp.dtype(cfg.model.param_dtype))


ZERO_SHOT = "base (zero-shot)"   # how an evaluation of the base without adapters is labelled
SPLIT_FILE = "data_split.json"   # what the run trains and evaluates on (instruct.split_record)


def finetune_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                          quiet: bool = False, stop_at: int | None = None) -> dict:
  """Run (or resume) LoRA / SparseLoRA fine-tuning of `cfg` in `workdir`.

  Everything a run could be refused for (a second run on the workdir, a checkpoint past
  train.steps, changed settings, base, tokenizer or data, data the settings cannot use) is
  checked before the workdir is written. train.steps=0 in a new workdir evaluates the base
  zero-shot (labelled so; metrics.jsonl step 0); a workdir whose checkpoint is past
  train.steps is refused (`lost_jax.main evaluate` scores it).
  """
  cfg, mesh = runtime.start(cfg, "finetune")
  nproc, pidx = jax.process_count(), jax.process_index()
  workdir = runtime.claim_workdir(workdir, cfg.train.steps)   # before the base is loaded
  model, cfg, tok = base_and_tokenizer(cfg, mesh)
  train_iter = instruct.make_train_iterator(cfg.data, tok, cfg.train.batch_size // nproc,
                                            seed=cfg.seed, process_index=pidx,
                                            process_count=nproc)
  held_out = eval_data(cfg, tok)
  chat_template = tokenizer_files.chat_template_of(cfg.data.tokenizer)
  if pidx == 0:
    tokenizer_files.check_run_tokenizer(workdir, tok, chat_template)
  run = runtime.open_workdir(workdir, cfg, _fingerprint(cfg, tok.vocab_size), mesh)
  cfg = run.cfg
  if pidx == 0:   # the base's tokenizer and chat template, for export and generation
    tokenizer_files.record_run_tokenizer(workdir, tok, chat_template)
    _record_split(cfg.data, workdir)
  module, plan = adapt(model, cfg, tok, workdir)
  trainer = _trainer(cfg, module, plan, mesh)
  state, rest, start = trainer.init_or_restore(run.ckpt, train_iter, jax.random.key(cfg.seed))
  evaluate = evaluation(cfg, tok, trainer, rest, show=not quiet, data=held_out)
  if cfg.train.steps == 0:   # zero-shot: LoRA's B starts at zero, so this is the base model
    result = {k: float(v) for k, v in evaluate(state).items()}
    metrics.MetricWriter(workdir, enabled=pidx == 0).write(0, result)
    metrics.append_evaluation(workdir, {"model": ZERO_SHOT, "base": cfg.init.path or
                                        cfg.init.source, "recipe": "finetune", **result})
    runtime.unlock_workdir(run.path)
    return {"model": ZERO_SHOT, "step": 0, **result}
  return trainer.fit(state, rest, start, train_iter, run, evaluate, quiet=quiet,
                     stop_at=stop_at)


def _record_split(data_cfg, workdir: str) -> None:
  """Write what the run trains and evaluates on into WORKDIR/data_split.json; say so when
  the eval records are held out of train_file."""
  record = instruct.split_record(data_cfg)
  files.atomic_write(os.path.join(workdir, SPLIT_FILE), json.dumps(record, indent=1))
  if data_cfg.task == "files" and not data_cfg.eval_file:   # printed even when quiet
    print(f"data: no eval_file: training on {record['train']}; evaluating on "
          f"{record['eval']} (recorded in {SPLIT_FILE})", flush=True)


FORWARDS = ("trained", "dense")   # the forward an evaluation's loss is computed under


def _under(cfg: ml_collections.FrozenConfigDict, forward: str) -> ml_collections.FrozenConfigDict:
  """cfg for scoring under `forward`: `trained` as the run trained (SparseLoRA: the context
  through the chosen channels), `dense` with no layer sparse (every channel: how the adapted
  model is served, and how LoRA runs are scored)."""
  if forward not in FORWARDS:
    raise UserError(f"forward={forward!r} is not one of {FORWARDS}. Fix: pick one of those.")
  if forward == "trained" or not cfg.sparse.enabled:
    return cfg
  return configs.with_group(cfg, sparse=dict(cfg.sparse.to_dict(), enabled=False))


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                        *, quiet: bool = False, forward: str = "trained") -> dict:
  """{"step", eval_loss, eval_tokens, eval_accuracy} of the fine-tune's checkpoint `step`
  (default: the newest): its adapters on the base `cfg.init` names, the loss under `forward`
  (`_under`); writes nothing but the estimator cache (after the checkpoint's fingerprint is
  found to match)."""
  cfg, mesh = runtime.start(cfg, "finetune")
  _under(cfg, forward)   # a bad name is refused before the checkpoint is opened
  ckpt, step = runtime.open_checkpoint(workdir, cfg, step)   # before the base is loaded
  try:
    model, cfg, tok = base_and_tokenizer(cfg, mesh)
    ckpt.check_compatible(_fingerprint(cfg, tok.vocab_size))   # the same base and data
    module, plan = adapt(model, cfg, tok, workdir)
    cfg = _under(cfg, forward)
    trainer = _trainer(cfg, module, plan, mesh)
    state, rest = trainer.restore(ckpt, step)
  finally:
    ckpt.close()
  return {"step": step, **evaluation(cfg, tok, trainer, rest, show=not quiet)(state)}


def evaluate_base(cfg: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False,
                  forward: str = "trained") -> dict:
  """The eval metrics of the base `cfg.init` names with no adapters (zero-shot: LoRA's B
  starts at zero), on the preset's held-out examples, the loss under `forward` (`_under`);
  `workdir` caches the estimators."""
  cfg, mesh = runtime.start(cfg, "finetune")
  _under(cfg, forward)
  workdir = runtime.make_workdir(workdir)
  module, plan, cfg, tok = adapted_and_tokenizer(cfg, workdir, mesh)
  cfg = _under(cfg, forward)
  trainer = _trainer(cfg, module, plan, mesh)
  state, rest = trainer.setup.init(jax.random.key(cfg.seed))
  return evaluation(cfg, tok, trainer, rest, show=not quiet)(state)


def accuracy(graphdef, params, rest, records, tok, prompt_len: int, max_new: int,
             template: str = "alpaca", batch_size: int = 32,
             final_answer: bool = False, show: bool = True) -> float:
  """Exact-match accuracy of greedy (KV-cache) answers of the adapted model, each answer
  ending at EOS or the template's end-of-turn token (a progress bar of the problems
  answered, with an ETA, when `show`)."""
  model = nnx.merge(graphdef, params, rest).model
  stop = instruct.stop_ids(tok, template)
  generated = []
  with progress.bar(len(records), "eval accuracy (greedy decoding)", "problem",
                    enabled=show, leave=False) as answered:
    for i in range(0, len(records), batch_size):
      chunk = records[i:i + batch_size]
      ids, mask = instruct.prompt_batch(chunk, tok, prompt_len, template)
      generated.append(np.asarray(greedy_generate(model, jnp.asarray(ids), jnp.asarray(mask),
                                                  max_new_tokens=max_new, stop_ids=stop,
                                                  pad_id=tok.pad_id)))
      answered.update(len(chunk))
  return instruct.exact_match(np.concatenate(generated), records, tok, final_answer, stop)
