"""Calibrate a SparseLoRA plan for the user's base and training data (`main calibrate`).

On the first sparse.calibration_batches training batches of the fine-tune's config, with the
base (LoRA starts at zero) and its estimators: the dense loss, then per part (FFN, attention)
and kept-channel count one compiled probe (`sparselora.calibrate`) measured for every layer,
each measurement cached in `<workdir>/calibration.json` as it finishes (a killed run goes on
from there). The plan with the fewest FLOPs per step whose summed loss increase fits the
budget is chosen; since single-layer increases do not add up, the additive budget is then
searched (`sl_cal.fit_plan`, bisection, each plan's loss measured and cached) for the largest
plan whose measured loss fits the budget. It is written to `<workdir>/plan.json`, which
`finetune --config.sparse.plan=` takes.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lost_jax import configs, files, progress
from lost_jax.adapters.sparselora import calibrate as sl_cal
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora import select as sl_select
from lost_jax.adapters.sparselora.model import forward
from lost_jax.errors import UserError
from lost_jax.measure import flops
from lost_jax.recipes import finetune, inputs
from lost_jax.recipes.lm import next_token_nll
from lost_jax.training import runtime

MEASUREMENTS = "calibration.json"
PLAN_FILE = "plan.json"


class _PlanModel:
  """A SparseLoRALlama's base and estimators under another static plan (and probe wrap): the
  model `next_token_nll` calls."""

  def __init__(self, module, plan: sl_plan.SparsityPlan, wrap=None):
    self.module, self.plan, self.wrap = module, plan, wrap
    self.cfg, self.lm_head = module.cfg, module.lm_head

  def __call__(self, tokens_BxL, lengths: sl_plan.StepLengths, positions_BxL=None,
               segment_ids_BxL=None, head: bool = True):
    est = jax.tree.map(lambda v: v[...], self.module.estimators,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
    return forward(self.module.model, tokens_BxL, est, self.plan, lengths.dense_len,
                   positions_BxL, segment_ids_BxL,
                   logits_from=tokens_BxL.shape[1] - lengths.logits_len, head=head,
                   wrap=self.wrap)


def batch_nll(graphdef):
  """Jitted (state, batch, target, plan, lengths, probe) -> (NLL sum, weight) of one batch:
  the plan on layer `target` only if probe, else on every layer (plan, lengths static)."""
  @functools.partial(jax.jit, static_argnames=("plan", "lengths", "probe"))
  def nll(state, batch, target, *, plan, lengths, probe):
    module = nnx.merge(graphdef, state)
    wrap = sl_cal.probe_wrap(target) if probe else None
    return next_token_nll(_PlanModel(module, plan, wrap), batch, lengths)
  return nll


def _fingerprint(cfg: ml_collections.FrozenConfigDict) -> dict:
  """What the measurements depend on: base, data and batches, estimator and channel choice."""
  sp = cfg.sparse
  return {"model": {k: v for k, v in cfg.model.to_dict().items() if k != "perf"},
          "inputs": inputs.fingerprint(cfg, "finetune"),
          "data": json.loads(cfg.data.to_json()), "seed": cfg.seed,
          "batch_size": cfg.train.batch_size, "batches": sp.calibration_batches,
          "sparse": {k: sp.get(k) for k in ("mode", "estimator_rank", "bucket",
                                            "dense_outputs", "estimator_tokens")
                     # absent for svd, as in the files written before the setting existed
                     + (("estimator",) if sp.get("estimator", "svd") != "svd" else ())}}


class Measurements:
  """calibration.json: {fingerprint, results: {key: [[nll sum, weight] per batch]}}, saved
  after every measurement; refused (one line) if written for other settings."""

  def __init__(self, workdir: str, fingerprint: dict):
    self.path = os.path.join(workdir, MEASUREMENTS)
    self.results: dict = {}
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        saved = json.load(f)
      if saved.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise UserError(f"{self.path} holds measurements of other settings (base, data, "
                        "batches or estimator). Fix: use a new --workdir, or the config that "
                        "wrote them")
      self.results = saved["results"]
    self.fingerprint = fingerprint

  def get(self, key: str, measure) -> float:
    """The mean loss of `key` over the batches (measure() -> [(sum, weight)] if not cached)."""
    if key not in self.results:
      self.results[key] = [[float(s), float(w)] for s, w in measure()]
      files.atomic_write(self.path, json.dumps({"fingerprint": self.fingerprint,
                                                "results": self.results}))
    sums, weights = np.asarray(self.results[key]).T
    return float(sums.sum() / max(weights.sum(), 1.0))


def _step_flops(cfg, plan: sl_plan.SparsityPlan, lengths: list[sl_plan.StepLengths]) -> float:
  """Mean model FLOPs of one train step under `plan` over the calibration batches' lengths."""
  targets = tuple(t.strip() for t in cfg.lora.targets.split(",") if t.strip())
  return float(np.mean([flops.sparselora_step_flops(
      cfg.model, plan, batch=cfg.train.batch_size, seq_len=cfg.data.seq_len,
      dense_len=n.dense_len, logits_len=n.logits_len, lora_rank=cfg.lora.rank,
      estimator_rank=cfg.sparse.estimator_rank, lora_targets=targets)["total"]
      for n in lengths]))


def _plan_key(plan: sl_plan.SparsityPlan) -> str:
  return (f"plan ffn={configs.format_layer_sparsity(plan.ffn)} "
          f"attn={configs.format_layer_sparsity(plan.attn)}")


def calibrate(cfg: ml_collections.ConfigDict, workdir: str, budget: float = 0.02, *,
              quiet: bool = False) -> dict:
  """Calibrate, write `<workdir>/plan.json` and return its record (see the module doc)."""
  if not budget >= 0:
    raise UserError(f"--budget={budget}: must be >= 0 (the loss increase allowed, relative to "
                    "the dense loss). Fix: e.g. --budget=0.02")
  cfg, mesh = runtime.start(cfg, "finetune")
  workdir = runtime.claim_workdir(workdir)   # one calibration (or run) per directory
  # The config's own plan plays no part (the estimators of every layer are built).
  base_cfg = configs.with_group(cfg, sparse=dict(cfg.sparse.to_dict(), enabled=True, plan="",
                                                 ffn="", attn=""))
  module, _, cfg, tok = finetune.adapted_and_tokenizer(base_cfg, workdir, mesh,
                                                       all_estimators=True)
  sp, n_layers = cfg.sparse, cfg.model.n_layers
  batches, lengths = finetune.calibration_inputs(cfg, tok)
  store = Measurements(workdir, _fingerprint(cfg))
  graphdef, state = nnx.split(module)
  nll = batch_nll(graphdef)

  def measure(plan, target=None):
    t = jnp.int32(-1 if target is None else target)
    return lambda: [jax.device_get(nll(state, b, t, plan=plan, lengths=n,
                                       probe=target is not None))
                    for b, n in zip(batches, lengths)]

  dense_plan = sl_plan.plan_from_config(sp, n_layers)   # ffn and attn '': the run's settings
  dense = store.get("dense", measure(dense_plan))
  sparsities = configs.parse_sparsity_list(sp.calibration_sparsities,
                                           "sparse.calibration_sparsities")
  width = {"ffn": cfg.model.ffn_dim,
           "attn": cfg.model.n_kv_heads * (cfg.model.d_model // cfg.model.n_heads)}
  # One compiled probe per part and kept-channel count (sparsities keeping as many share it).
  kept = {(part, s): sl_select.keep_count(width[part], s) for part in sl_cal.PARTS
          for s in sparsities}
  probes = {(part, k): s for (part, s), k in sorted(kept.items(), reverse=True)}
  todo = [(part, k, i) for part, k in probes for i in range(n_layers)
          if f"{part} k={k} layer={i}" not in store.results]
  increase: dict = {}
  with progress.bar(len(todo), "calibrating (one part of one layer sparse)", "probe",
                    enabled=not quiet) as bar:
    for (part, k), s in sorted(probes.items()):
      plan = sl_cal.part_plan(part, s, dense_plan)
      for i in range(n_layers):
        key = f"{part} k={k} layer={i}"
        cached = key in store.results
        increase[(part, k, i)] = store.get(key, measure(plan, i)) / dense - 1.0
        if not cached:
          bar.update(1)
  base_flops = _step_flops(cfg, dense_plan, lengths)
  groups = {(part, i): [sl_cal.Option(s, increase[(part, kept[(part, s)], i)],
                                      base_flops - _step_flops(cfg, sl_cal.plan_of(
                                          {(part, i): s}, dense_plan), lengths))
                        for s in sparsities]
            for part in sl_cal.PARTS for i in range(n_layers)}

  def measured(choice):   # the whole plan's loss increase over dense, cached by plan
    plan = sl_cal.plan_of(choice, dense_plan)
    inc = store.get(_plan_key(plan), measure(plan)) / dense - 1.0
    if not quiet and jax.process_index() == 0:
      ratio = _step_flops(cfg, plan, lengths) / base_flops
      print(f"plan of {len(choice)} sparse parts, {ratio:.3f}x LoRA's FLOPs: measured "
            f"{100 * inc:+.2f}% over dense (budget {100 * budget:.2f}%)", flush=True)
    return inc

  choice, _, search = sl_cal.fit_plan(groups, budget, measured)
  plan = sl_cal.plan_of(choice, dense_plan)
  loss = store.get(_plan_key(plan), measure(plan)) if choice else dense   # measured (cached)
  plan_flops = _step_flops(cfg, plan, lengths)
  record = sl_plan.plan_record(
      plan, cfg.model, ffn_spec=configs.format_layer_sparsity(plan.ffn),
      attn_spec=configs.format_layer_sparsity(plan.attn), budget=budget, dense_loss=dense,
      plan_loss=loss, increase=loss / dense - 1.0, flops_per_step=plan_flops,
      lora_flops_per_step=base_flops, flops_vs_lora=plan_flops / base_flops,
      batches=sp.calibration_batches,
      search=[{"additive_budget": b, "parts": n, "increase": inc} for b, n, inc in search],
      measured={f"{part} {i}": {f"{o.sparsity:g}": o.increase for o in opts}
                for (part, i), opts in groups.items()})
  files.atomic_write(os.path.join(workdir, PLAN_FILE), json.dumps(record, indent=1))
  if not quiet and jax.process_index() == 0:
    print(report(record, sparsities), flush=True)
  return record


def report(record: dict, sparsities) -> str:
  """The per-layer table (loss increase per part and sparsity, the chosen plan) and summary."""
  head = ([f"ffn {s:g}" for s in sparsities] + [f"attn {s:g}" for s in sparsities]
          + ["plan ffn", "plan attn"])
  lines = ["| layer | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
  for i in range(record["model"]["n_layers"]):
    cells = [f"{100 * record['measured'][f'{part} {i}'][f'{s:g}']:+.2f}%"
             for part in sl_cal.PARTS for s in sparsities]
    cells += [f"{record['ffn'][i]:g}" if record["ffn"][i] else "-",
              f"{record['attn'][i]:g}" if record["attn"][i] else "-"]
    lines.append(f"| {i} | " + " | ".join(cells) + " |")
  lines += [
      "(loss increase over dense with only that part of that layer sparse, on "
      f"{record['batches']} training batches)",
      f"plan: sparse.ffn='{record['ffn_spec']}' sparse.attn='{record['attn_spec']}'",
      f"loss: dense {record['dense_loss']:.4f}, plan {record['plan_loss']:.4f} "
      f"({100 * record['increase']:+.2f}%, budget {100 * record['budget']:.2f}%)",
      f"FLOPs per step: {record['flops_per_step'] / 1e9:.3f} GFLOP, "
      f"{record['flops_vs_lora']:.3f}x LoRA ({record['lora_flops_per_step'] / 1e9:.3f} GFLOP)"]
  return "\n".join(lines)
