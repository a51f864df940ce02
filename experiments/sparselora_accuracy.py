"""SparseLoRA's accuracy on a real model: SmolLM2-135M-Instruct (GGUF) on the GSM-style task.

  python -m experiments.sparselora_accuracy --config=configs/finetune.py:smollm2_135m_gsm

Runs (same data, steps, batch; LoRA r32 on q,k,v,o): zero-shot; LoRA, SparseLoRA (the paper's
recipe scaled to 30 layers), sparselora_late (a sparsity the 135M model keeps its loss at) and
one calibrated plan per --budgets budget (`lost_jax.main calibrate`, made once before its first
run) with --seeds seeds each; ablations on the first seed: output tokens sparse too, random
channels, oracle (exact) channels. Each finished run stores result.json in
<workdir_root>/<run>/ and is skipped on a rerun (re-scored from its final checkpoint when it
was scored on another held-out set); an interrupted run resumes from its checkpoint. Finished
results and calibrated plans are also kept in --results_dir (default
docs/results/sparselora_smollm2_runs), keyed by the run's config and the code version
(experiments/runs.code_version): a fresh machine with a checkout reuses them instead of
training again, and a result of other code or another config is never reused.
Writes docs/results/sparselora_smollm2.{md,json,png} with exact-match accuracy on the held-out
split, eval loss under the dense forward (every run) and under the forward each run trained
with, median step time, FLOPs per step, and the per-layer overlap between the estimator's
channels and the oracle's.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, runs
from lost_jax import configs
from lost_jax.recipes import calibrate, finetune
from lost_jax.data import instruct
from lost_jax.errors import UserError
from lost_jax.measure import flops
from lost_jax.training import checkpoint, metrics
from lost_jax.adapters.sparselora import model as sparselora
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora import select as sl_select

RESULT_FILE = "result.json"   # a finished run's result, in its workdir
# run name -> (cfg overrides, seed); seeds beyond 0 are added for lora / sparselora.
# SparseLoRA at a sparsity sized for the 135M model (configs.SMOLLM2_LATE_*), seeds as
# sparselora: the paper's recipe scaled to 30 layers loses most of the context (see
# experiments/sparselora_diagnose.py).
VARIANTS = {
    "sparselora_late": {"sparse.ffn": configs.SMOLLM2_LATE_FFN,
                        "sparse.attn": configs.SMOLLM2_LATE_ATTN},
}
ABLATIONS = {
    "sparse_outputs": {"sparse.dense_outputs": False},
    "random_channels": {"sparse.mode": "random"},
    "oracle_channels": {"sparse.mode": "oracle"},
}


CALIBRATION_DIR = "calibration"   # under workdir_root: `calibrate`'s measurements and plans


def calibrated_name(budget: float) -> str:
  return f"calibrated_b{budget:g}"


def plan_name(budget: float) -> str:
  """The name of `budget`'s plan: its file under workdir_root and its record in the store."""
  return f"plan_b{budget:g}"


def plan_path(root: str, budget: float) -> str:
  """Where calibrated_plan keeps the plan of `budget`."""
  return os.path.join(root, CALIBRATION_DIR, plan_name(budget) + ".json")


def keyed(cfg) -> dict:
  """What a stored result is keyed by besides the code: the run's config with its machine's
  paths reduced to file names (the base GGUF in site-packages, the plan under workdir_root;
  a plan's content follows from the config and the code, which the key holds)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.init.path = os.path.basename(cfg.init.path)
  if cfg.sparse.get("plan"):
    cfg.sparse.plan = os.path.basename(cfg.sparse.plan)
  return runs.keyed_config(cfg)


def stored(store: str, name: str, cfg) -> dict | None:
  """The record <store>/<name>.json when it was made by this code (runs.code_version) for
  this config (keyed), else None: another config's or code's record is never reused."""
  path = os.path.join(store, name + ".json")
  if not store or not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  if record.get("config") != keyed(cfg) or record.get("code") != runs.code_version():
    return None
  return record


STORE_FIELDS = ("name", "config", "code")   # what store_record adds to a record


def store_record(store: str, name: str, cfg, **fields) -> None:
  if store:
    runs.write_json(os.path.join(store, name + ".json"),
                    {"name": name, "config": keyed(cfg), "code": runs.code_version(), **fields})


def calibrated_plan(cfg, root: str, budget: float, store: str = "") -> str:
  """plan_path(root, budget): the plan `lost_jax.main calibrate --budget=<budget>` chooses for
  cfg's base and data, with its wall time (`wall_s`); the per-layer measurements, cached in
  <root>/calibration, are made once for every budget. A plan kept in `store` for this config
  and code is copied there instead of calibrating again."""
  path, name = plan_path(root, budget), plan_name(budget)
  if not os.path.exists(path):
    kept = stored(store, name, cfg)
    if kept is not None and kept.get("budget") == budget:
      runs.write_json(path, plan_of(kept))
    else:
      t0 = time.time()
      record = calibrate.calibrate(cfg, os.path.dirname(path), budget)
      runs.write_json(path, {**record, "wall_s": time.time() - t0})
  with open(path) as f:
    store_record(store, name, cfg, **json.load(f))
  return path


def plan_of(record: dict) -> dict:
  """The plan file a kept plan record holds: the record less the store's own fields (a kept
  record is itself a plan file that `finetune` and `bench_sparselora --plan` read)."""
  return {k: v for k, v in record.items() if k not in STORE_FIELDS}


def run_specs(seeds: int, budgets=(), root: str = "") -> dict[str, dict]:
  """run name -> cfg overrides, in the order they run: seed by seed (every method's seed 0
  first, so a half-finished sweep already compares them all), the calibrated plans (the
  question the page answers) right after LoRA; calibrated_b<budget>_s<seed> train on
  plan_path(root, budget)."""
  specs = {"zero_shot": {"train.steps": 0, "sparse.enabled": False}}
  for s in range(seeds):
    specs[f"lora_s{s}"] = {"sparse.enabled": False, "seed": s}
    for b in budgets:
      specs[f"{calibrated_name(b)}_s{s}"] = {"sparse.plan": plan_path(root, b), "seed": s}
    specs[f"sparselora_s{s}"] = {"seed": s}
    for name, overrides in VARIANTS.items():
      specs[f"{name}_s{s}"] = {**overrides, "seed": s}
  specs.update({k: {**v, "seed": 0} for k, v in ABLATIONS.items()})
  return specs


def apply(cfg, overrides: dict):
  cfg = cfg.copy_and_resolve_references()
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = cfg
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


def gguf_model_config(path: str):
  """The model config a GGUF file's metadata describes."""
  from lost_jax.formats import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  return gguf_lib.model_config(gguf_lib.metadata(gguf_lib.open_reader(path)), path)


def flops_per_step(cfg) -> dict:
  """Train-step FLOPs at the batch's median dense suffix (the data decide it)."""
  from lost_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  model_cfg = gguf_model_config(cfg.init.path)
  plan = (sl_plan.read_plan_file(cfg.sparse.plan, model_cfg) if cfg.sparse.get("plan") else
          sl_plan.plan_from_config(cfg.sparse, model_cfg.n_layers))
  tok = tokenizer.from_path(cfg.init.path)
  batch = instruct.make_eval_batches(cfg.data, tok, cfg.train.batch_size)[0]
  # The LM head runs on the loss suffix only (sl_plan.step_lengths), LoRA or not.
  suffix = sl_plan.dense_suffix_len(batch["weights"], cfg.sparse.bucket)
  if not cfg.sparse.enabled:
    dense = cfg.data.seq_len
  elif not cfg.sparse.get("dense_outputs", True):
    dense = 1
  else:
    dense = suffix
  return flops.sparselora_step_flops(model_cfg, plan, batch=cfg.train.batch_size,
                                     seq_len=cfg.data.seq_len, dense_len=dense,
                                     lora_rank=cfg.lora.rank, estimator_rank=8,
                                     logits_len=suffix)


def eval_set(cfg) -> dict:
  """What a result was scored on: the held-out records' count (accuracy on the first
  `accuracy` of them, loss on all) and a hash of them."""
  records = instruct.task_records(cfg.data, "eval")
  digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
  return {"size": len(records), "accuracy": min(len(records), cfg.train.accuracy_examples),
          "sha256": digest[:16]}


def rescore(cfg, workdir: str, result: dict, scored_on: dict) -> dict:
  """A finished run's result re-scored on the current eval set (`eval_set(cfg)`, given) from
  its final checkpoint (zero-shot: the base again); timings and FLOPs are kept, the old scores
  under 'previous'."""
  if cfg.train.steps:   # the run's final adapters
    out = finetune.evaluate_checkpoint(cfg, workdir, cfg.train.steps)
  else:                 # zero-shot: the base again
    out = finetune.evaluate_base(cfg, workdir)
  keys = ("eval_accuracy", "eval_loss", "eval_loss_dense", "eval_set")
  rest = {k: v for k, v in result.items() if k != "eval_loss_dense"}   # of the old set
  return {**rest, "eval_accuracy": out.get("eval_accuracy"), "eval_loss": out["eval_loss"],
          "eval_set": scored_on, "previous": {k: result.get(k) for k in keys}}


def with_dense_loss(cfg, workdir: str, result: dict) -> dict:
  """`result` with eval_loss_dense: the final adapters' eval loss under the dense forward
  (every channel: finetune.evaluate_checkpoint forward='dense'), a LoRA run's own eval loss.
  Left out when the run's final checkpoint is gone (or it trained no step). Accuracy is not
  scored again: greedy decoding is dense under either forward."""
  if "eval_loss_dense" in result or not cfg.train.steps:
    return result
  if not cfg.sparse.enabled:
    return {**result, "eval_loss_dense": result["eval_loss"]}
  if cfg.train.steps not in checkpoint.saved_steps(workdir):
    return result
  out = finetune.evaluate_checkpoint(apply(cfg, {"train.accuracy_examples": 0}), workdir,
                                     cfg.train.steps, forward="dense")
  return {**result, "eval_loss_dense": out["eval_loss"]}


def one_run(cfg, workdir: str, store: str = "") -> dict:
  """finetune_and_evaluate, or the stored result of a finished run: the one kept in `store`
  for this config and code (stored()), else the workdir's (re-scored from its final
  checkpoint when it was scored on another eval set). A finished result is kept in `store`
  under the workdir's name."""
  name = os.path.basename(os.path.normpath(workdir))
  kept = stored(store, name, cfg)
  if kept is not None:
    return kept["result"]
  result = _one_run(cfg, workdir)
  store_record(store, name, cfg, result=result)
  return result


def of_this_code(result: dict) -> bool:
  """Whether a workdir's result was trained on these lost_jax sources (a result from before
  results recorded their code counts as this code's, as it always did)."""
  made = result.get("code_version") or ""
  return not made or f"lost_jax sources {runs.sources_hash()}" in made


def _one_run(cfg, workdir: str) -> dict:
  path = os.path.join(workdir, RESULT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    if not of_this_code(result):
      other = result["code_version"].removeprefix("Code version: ").rstrip(".")
      raise UserError(f"{workdir} holds a run of other code ({other}) and would be reused as "
                      "this code's. Fix: move the workdir away (or use another "
                      "--workdir_root) to train it again")
    scored_on = eval_set(cfg)
    before = result
    if result.get("eval_set") != scored_on:
      result = rescore(cfg, workdir, result, scored_on)
    result = with_dense_loss(cfg, workdir, result)
    if result is not before:
      runs.write_json(path, result)
    return result
  t0 = time.time()
  out = finetune.finetune_and_evaluate(cfg, workdir, quiet=False)
  rows = metrics.read_metrics(workdir)
  if out.get("eval_loss") is None:   # SIGTERM/SIGINT saved a checkpoint and returned
    raise runs.interrupted(cfg.name, cfg.train.steps, rows, workdir)
  times = [r["step_time"] for r in rows if "step_time" in r]
  result = {"eval_accuracy": out.get("eval_accuracy"), "eval_loss": out.get("eval_loss"),
            # the first logged windows hold compilation (dense phase, then sparse)
            "step_time": statistics.median(times[2:] or times) if times else None,
            "flops_per_step": flops_per_step(cfg)["total"] if cfg.train.steps else None,
            "steps": cfg.train.steps, "wall_s": time.time() - t0, "eval_set": eval_set(cfg),
            "code_version": common.code_version_line()}
  result = with_dense_loss(cfg, workdir, result)
  runs.write_json(path, result)
  return result


def overlap(cfg, workdir: str, n_batches: int = 2) -> dict:
  """Per-layer |estimator channels & oracle channels| / kept, on held-out batches (base + the
  run's estimators; LoRA is zero at the start, so this is the frozen model's choice)."""
  path = os.path.join(workdir, "overlap.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from lost_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  module, plan, _ = finetune.adapted_model(cfg, workdir)
  tok = tokenizer.from_path(cfg.init.path)
  batches = instruct.make_eval_batches(cfg.data, tok, cfg.train.batch_size)[:n_batches]
  est = jax.tree.map(lambda v: v[...], module.estimators,
                     is_leaf=lambda v: hasattr(v, "get_value"))
  oracle = sl_plan.SparsityPlan(plan.ffn, plan.attn, "oracle")
  ffn, attn = {}, {}
  for batch in batches:
    dense = sl_plan.dense_suffix_len(batch["weights"], cfg.sparse.bucket)
    args = (jnp.asarray(batch["inputs"]),)
    kw = dict(dense_len=max(1, dense), positions_BxL=jnp.asarray(batch["positions"]),
              segment_ids_BxL=jnp.asarray(batch["segment_ids"]), return_indices=True)
    _, a = sparselora.forward(module.model, *args, est, plan, **kw)
    _, b = sparselora.forward(module.model, *args, est, oracle, **kw)
    for i in plan.estimator_layers():
      if a[i]["ffn"] is not None:
        ffn.setdefault(i, []).append(sl_select.channel_overlap(a[i]["ffn"], b[i]["ffn"]))
      if a[i]["attn"] is not None:
        attn.setdefault(i, []).append(sl_select.channel_overlap(a[i]["attn"].v,
                                                                 b[i]["attn"].v))
  result = {"ffn": {i: float(np.mean(v)) for i, v in ffn.items()},
            "attn_v": {i: float(np.mean(v)) for i, v in attn.items()}}
  runs.write_json(path, result)
  return result


def _ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}"      # '-': the layer keeps that part dense


def results_code_line(results: dict, results_commit: str = "") -> str:
  """Which code the stored runs were trained on (each result's 'code_version', recorded at
  training time)."""
  made = sorted({r.get("code_version") or "" for r in results.values()})
  names = {v: [n for n in results if (results[n].get("code_version") or "") == v] for v in made}
  parts = [f"{', '.join(names[v])}: {v.removeprefix('Code version: ').rstrip('.')}"
           for v in made if v]
  if "" in names:
    parts.append(f"{', '.join(names[''])}: not recorded in the result (trained before results "
                 "recorded their code"
                 + (f"; the stored results were last committed at {results_commit}"
                    if results_commit else "") + ")")
  return "Runs trained on: " + "; ".join(parts) + "."


TARGET_FLOPS = 0.80     # #26's target: within TARGET_POINTS of LoRA at <= 0.80x its FLOPs
TARGET_POINTS = 0.01


def family_of(name: str) -> str:
  """A run's family: its name without _s<seed> (lora_s2 -> lora; zero_shot stays)."""
  return name.rsplit("_s", 1)[0] if name[-1].isdigit() else name


def members(results: dict, family: str) -> list[str]:
  """The runs of a family: its seeds (or the run itself)."""
  return [n for n in results if family_of(n) == family]


def family_stats(results: dict) -> dict[str, dict]:
  """family (run name without _s<seed>) -> accuracies over its seeds, their mean, min, max,
  and mean FLOPs per step; runs without an accuracy or FLOPs (zero-shot) are left out."""
  fams: dict[str, list[dict]] = {}
  for n, r in results.items():
    if r.get("eval_accuracy") is not None and r.get("flops_per_step"):
      fams.setdefault(family_of(n), []).append(r)
  return {f: {"acc": [r["eval_accuracy"] for r in rs],
              "mean": statistics.mean(r["eval_accuracy"] for r in rs),
              "min": min(r["eval_accuracy"] for r in rs),
              "max": max(r["eval_accuracy"] for r in rs),
              "flops": statistics.mean(r["flops_per_step"] for r in rs)}
          for f, rs in fams.items()}


def target_lines(results: dict, seeds: int) -> list[str]:
  """The target check, computed: which sparse families are within TARGET_POINTS of LoRA's
  mean accuracy with overlapping seed ranges at <= TARGET_FLOPS x LoRA's FLOPs per step;
  if none, the most accurate family under that FLOPs bound and the cheapest family within
  the accuracy bound. Says how many seeds each rests on."""
  stats = family_stats(results)
  lora = stats.pop("lora", None)
  head = (f"Target: a sparse plan within {100 * TARGET_POINTS:g} point of LoRA's mean accuracy, "
          f"seed ranges overlapping, at <= {TARGET_FLOPS:.2f}x LoRA's FLOPs per step")
  header = ["plan", "seeds", "accuracy", "vs LoRA (points)", "seed ranges overlap LoRA's",
            "FLOPs vs LoRA", "meets the target"]
  if lora is None or not stats:   # the table stays (empty): the README quotes it by position
    return [f"{head}: not checked yet (needs LoRA and at least one sparse run finished).", "",
            common.markdown_table(header, [])]
  rows = []
  for fam, st in sorted(stats.items(), key=lambda kv: kv[1]["flops"]):
    ratio, gap = st["flops"] / lora["flops"], st["mean"] - lora["mean"]
    overlap = st["max"] >= lora["min"] and st["min"] <= lora["max"]
    st.update(ratio=ratio, gap=gap, meets=(ratio <= TARGET_FLOPS and gap >= -TARGET_POINTS
                                           and overlap))
    rows.append([fam, len(st["acc"]), f"{st['mean']:.3f}", f"{100 * gap:+.1f}",
                 "yes" if overlap else "no", f"{ratio:.2f}", "yes" if st["meets"] else "no"])
  met = [f for f, st in stats.items() if st["meets"]]
  n_note = (f"LoRA n={len(lora['acc'])} (mean {lora['mean']:.3f}, range "
            f"{lora['min']:.3f} – {lora['max']:.3f}); planned seeds {seeds} per method")
  if met:
    best = min(met, key=lambda f: stats[f]["ratio"])
    verdict = (f"met by {', '.join(sorted(met))}; the cheapest, {best}, runs at "
               f"{stats[best]['ratio']:.2f}x LoRA's FLOPs, {100 * stats[best]['gap']:+.1f} "
               f"points (n={len(stats[best]['acc'])})")
  else:
    cheap = [f for f, st in stats.items() if st["ratio"] <= TARGET_FLOPS]
    close = [f for f, st in stats.items()
             if st["gap"] >= -TARGET_POINTS and st["max"] >= lora["min"]]
    parts = ["not met by any finished plan"]
    if cheap:
      b = max(cheap, key=lambda f: stats[f]["mean"])
      parts.append(f"the most accurate at <= {TARGET_FLOPS:.2f}x FLOPs is {b} "
                   f"({stats[b]['mean']:.3f}, {100 * stats[b]['gap']:+.1f} points, "
                   f"{stats[b]['ratio']:.2f}x)")
    if close:
      c = min(close, key=lambda f: stats[f]["ratio"])
      parts.append(f"the cheapest within {100 * TARGET_POINTS:g} point is {c} "
                   f"({stats[c]['ratio']:.2f}x LoRA's FLOPs)")
    verdict = "; ".join(parts)
  return [f"{head}: {verdict}. Rests on {n_note}; accuracy on the held-out problems above.",
          "", common.markdown_table(header, rows)]


# experiments/bench_sparselora.py's records at this shape (the JSON beside each page)
BENCH_RECORDS = os.path.join("docs", "benchmarks", "sparselora_smollm2*.json")


def base_shape(cfg) -> dict | None:
  """The base's shape as bench_sparselora records it (the plan's dims and the vocab): from
  cfg.model for a random base, from the GGUF's metadata otherwise; None where the file is
  not on this machine."""
  keys = (*sl_plan.PLAN_SHAPE, "vocab_size")
  if cfg.init.source == "random":
    return {k: int(cfg.model[k]) for k in keys}
  if not os.path.exists(cfg.init.path):
    return None
  model_cfg = gguf_model_config(cfg.init.path)
  return {k: int(model_cfg[k]) for k in keys}


def bench_records(pattern: str = "") -> dict[str, dict]:
  """page name (docs/benchmarks/<stem>.md) -> bench_sparselora's record beside it."""
  import glob  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(pattern or os.path.join(common.REPO, BENCH_RECORDS))):
    with open(path, encoding="utf-8") as f:
      out[os.path.splitext(os.path.basename(path))[0] + ".md"] = json.load(f)
  return out


def quiet_speedups(cfg, seeds: int, budgets, plans: dict, shape: dict | None,
                   records: dict[str, dict]) -> dict[str, tuple[str, dict]]:
  """family -> (page, record) of the bench that timed its plan's sparse step against LoRA's,
  interleaved in one process: the same per-layer plan, base shape, batch and sequence length,
  on this code's lost_jax sources (a timing of other sources says nothing about this step).
  The ablations (other channel choices, sparse outputs) are not timed."""
  if shape is None:
    return {}
  sources = runs.code_version()["sources"]
  specs = run_specs(seeds, budgets)
  wanted = {}
  for fam in ("sparselora", *VARIANTS):
    try:
      plan = sl_plan.plan_from_config(apply(cfg, specs[f"{fam}_s0"]).sparse, shape["n_layers"])
    except UserError:   # a variant's layers beyond this model's depth: not a plan of it
      continue
    wanted[fam] = (list(plan.ffn), list(plan.attn))
  for b, p in plans.items():
    wanted[calibrated_name(b)] = (list(p["ffn"]), list(p["attn"]))
  out = {}
  for page, rec in records.items():
    s = rec.get("settings", {})
    if (rec.get("code", {}).get("sources") != sources or rec.get("shape") != shape
        or s.get("batch") != cfg.train.batch_size or s.get("seq_len") != cfg.data.seq_len):
      continue
    for fam, plan in wanted.items():
      if plan == (rec["plan"]["ffn"], rec["plan"]["attn"]):
        out.setdefault(fam, (page, rec))
  return out


def report(results: dict, ov: dict, cfg, command: str, seeds: int,
           results_commit: str = "", plans: dict | None = None, budgets=(),
           speed: dict | None = None) -> str:
  """The page; plans: budget -> the calibrated plan's record (calibrated_plan), if any;
  budgets: the calibrated variants asked for (a row each, 'pending' until they run);
  speed: quiet_speedups' benches."""
  plans, speed = plans or {}, speed or {}
  budgets = sorted(set(budgets) | set(plans))
  def cell(name, key, fmt):
    done = members(results, name)
    vals = [results[n][key] for n in done if results[n].get(key) is not None]
    if not vals:
      return "-" if done else "pending"      # finished without it (zero-shot: no steps)
    m = fmt.format(statistics.mean(vals))   # ± the sample std (ddof=1) over seeds
    return m + (f" ± {fmt.format(statistics.stdev(vals))} (n={len(vals)})" if len(vals) > 1
                else "")

  specs = run_specs(seeds, budgets)

  def forward(name):   # the forward the run's eval loss is computed under
    o = specs.get(name, specs.get(name + "_s0", {}))
    if o.get("sparse.enabled") is False:
      return "dense"
    return "sparse (outputs too)" if o.get("sparse.dense_outputs") is False else "sparse context"
  names = ["zero_shot", "lora", "sparselora", *VARIANTS,
           *(calibrated_name(b) for b in budgets), *ABLATIONS]
  late = VARIANTS["sparselora_late"]
  scored_on = eval_set(cfg)
  n_eval = scored_on["accuracy"]
  stale = [n for n in results if results[n].get("eval_set") != scored_on]
  lora_f = [results[n]["flops_per_step"] for n in results if n.startswith("lora_s")]
  rows = []
  for n in names:
    f = [results[k]["flops_per_step"] for k in members(results, n)
         if results[k].get("flops_per_step")]
    rel_f = f"{statistics.mean(f) / statistics.mean(lora_f):.2f}" if f and lora_f else "-"
    acc = [results[k]["eval_accuracy"] for k in members(results, n)
           if results[k].get("eval_accuracy") is not None]
    rows.append([n, cell(n, "eval_accuracy", "{:.3f}"),
                 f"{min(acc):.3f} – {max(acc):.3f}" if len(acc) > 1 else "-",
                 # a dense run's own eval loss is its dense-forward loss
                 cell(n, "eval_loss" if forward(n) == "dense" else "eval_loss_dense",
                      "{:.4f}"),
                 cell(n, "eval_loss", "{:.4f}"), forward(n), cell(n, "step_time", "{:.2f}"),
                 f"{statistics.mean(f) / 1e12:.3f}" if f else "-", rel_f,
                 "1.00x" if n == "lora" else
                 f"{speed[n][1]['summary']['speedup']:.2f}x" if n in speed else "-"])
  lines = ["# SparseLoRA vs LoRA on SmolLM2-135M-Instruct (GSM-style word problems)", "",
           common.page_head(command),
           f"Setup: {cfg.init.path.split('/')[-1]} (Q4_1 dequantised to float32), task "
           f"`{cfg.data.task}`, template `{cfg.data.template}`, {cfg.train.steps} steps x batch "
           f"{cfg.train.batch_size}, seq_len {cfg.data.seq_len}, lr {cfg.train.lr}, LoRA r"
           f"{cfg.lora.rank} alpha {cfg.lora.alpha} on {cfg.lora.targets}; SparseLoRA FFN "
           f"`{cfg.sparse.ffn}`, attention `{cfg.sparse.attn}`, dense for the first "
           f"{cfg.sparse.start_frac:.0%} of steps; sparselora_late: FFN "
           f"`{late['sparse.ffn']}`, attention `{late['sparse.attn'] or 'dense'}`. Accuracy: "
           f"exact match of the final number on {n_eval} held-out problems (greedy, dense "
           f"inference; eval set {scored_on['sha256']}); dense eval loss: the final "
           "adapters with every channel, one forward for every run (`evaluate "
           "--forward=dense`; '-' where a stored run has no final checkpoint left to score); "
           "trained-forward eval loss: under the forward the run trained with, named in the "
           "next column (sparse context: the context tokens through the selected channels, "
           f"the output tokens dense); seeds {seeds} for LoRA and SparseLoRA (mean ± sample "
           f"std, ddof=1). {common.environment()}.", "",
           results_code_line(results, results_commit), "",
           common.markdown_table(["run", "accuracy", "seed range", "dense eval loss",
                                  "trained-forward eval loss", "trained forward", "step s",
                                  "TFLOPs/step", "FLOPs vs LoRA", "quiet step speedup"], rows),
           "",
           *target_lines(results, seeds), "",
           "Step times are medians of each run's logged steps, measured while other jobs shared "
           "the machine at varying load, so their ratios are not speed results. Quiet step "
           "speedup: LoRA's median step time over the plan's sparse step, the two timed "
           "interleaved (ABBA) in one process on an otherwise idle machine by "
           "experiments/bench_sparselora.py at this shape, batch and length (random weights), "
           "on this code's lost_jax sources; a run dense for its first steps "
           "(sparse.start_frac) gains it on the rest only; '-': not timed on this code"
           + ("" if not speed else "; " + "; ".join(
               f"{fam}: docs/benchmarks/{page} (load {rec['load'][0]:.1f} - "
               f"{rec['load'][1]:.1f}, per-step ratios IQR "
               f"{rec['summary']['pair_speedup_q25']:.2f} - "
               f"{rec['summary']['pair_speedup_q75']:.2f})"
               for fam, (page, rec) in sorted(speed.items()))) + ".",
           ""]
  if plans:
    lora_wall = [results[n]["wall_s"] for n in results
                 if n.startswith("lora_s") and results[n].get("wall_s")]
    spent = sum(p["wall_s"] for p in plans.values())
    share = (f"; all budgets together {spent:.0f} s = {spent / statistics.mean(lora_wall):.0%}"
             f" of a LoRA fine-tune's mean wall time ({statistics.mean(lora_wall):.0f} s, "
             f"n={len(lora_wall)})" if lora_wall else "")
    lines += [f"Calibrated plans (`lost_jax.main calibrate --budget=B` on the first "
              f"{cfg.sparse.calibration_batches} training batches, sparsities "
              f"{cfg.sparse.calibration_sparsities} per layer and part; the per-layer "
              f"measurements are made once and shared by every budget{share}; wall s is each "
              "calibrate call's own time: per-layer probes already in the calibration "
              "directory's cache, from an earlier or interrupted call, are neither measured "
              "nor timed again, so a call that found them all cached times only the plan "
              "search):", "",
              common.markdown_table(
                  ["run", "budget", "FFN", "attention", "calibration loss vs dense",
                   "FLOPs vs LoRA (calibration batches)", "additive plan: parts, measured",
                   "plans measured", "wall s"],
                  [[calibrated_name(b), f"{b:g}", p["ffn_spec"] or "dense",
                    p["attn_spec"] or "dense", f"{100 * p['increase']:+.2f}%",
                    f"{p['flops_vs_lora']:.2f}", _additive(p), len(p.get("search", [])),
                    f"{p['wall_s']:.0f}"]
                   for b, p in sorted(plans.items())]), "",
              "Additive plan: the plan whose summed single-layer loss increases fill the "
              "budget, and its measured loss over dense; when that is over budget, `calibrate` "
              "bisects the additive budget for the largest plan whose measured loss fits "
              "(plans measured: how many whole plans that took).", "",
              *budget_lines(results, plans)]
  if stale:
    lines += [f"Scored on another held-out set (re-scored by the command without "
              f"--report_only): {', '.join(stale)}.", ""]
  if ov:
    lines += ["Per-layer overlap |estimator ∩ oracle| / kept channels (frozen model, held-out "
              "batches):", "",
              common.markdown_table(["layer", "FFN", "attention v"],
                                    [[i, _ratio(ov["ffn"].get(i)), _ratio(ov["attn_v"].get(i))]
                                     for i in sorted(set(ov["ffn"]) | set(ov["attn_v"]),
                                                     key=int)]), ""]
  return "\n".join(lines)


def budget_lines(results: dict, plans: dict) -> list[str]:
  """What a calibration budget allows next to what fine-tuning reaches: the budgets are
  relative to the frozen base's dense loss on the calibration batches, the frontier's losses
  are those of fine-tuned models; each calibrated family's eval losses against LoRA's mean."""
  def mean_loss(fam, key):
    vals = [results[n][key] for n in members(results, fam) if results[n].get(key) is not None]
    return (statistics.mean(vals), len(vals)) if vals else (None, 0)
  lora, n_lora = mean_loss("lora", "eval_loss")
  if not plans or lora is None:
    return []
  base = statistics.mean(p["dense_loss"] for p in plans.values())
  parts = []
  for b, p in sorted(plans.items()):
    text = (f"budget {b:g} allows +{b * p['dense_loss']:.4f} nats "
            f"({b * p['dense_loss'] / lora:.0%} of LoRA's final eval loss) and its plan used "
            f"{p['plan_loss'] - p['dense_loss']:+.4f}")
    own, n = mean_loss(calibrated_name(b), "eval_loss")
    dense, _ = mean_loss(calibrated_name(b), "eval_loss_dense")
    if own is not None:
      text += (f"; its fine-tuned runs' eval loss is {own - lora:+.4f} nats from LoRA's under "
               f"their sparse-context forward" + (f" and {dense - lora:+.4f} under the dense "
                                                  "forward" if dense is not None else "")
               + f" (n={n})")
    parts.append(text)
  return [f"What a budget means after fine-tuning: budgets are relative to the frozen base's "
          f"dense loss on the calibration batches ({base:.4f} nats), {base / lora:.0f}x "
          f"LoRA's mean final eval loss ({lora:.4f}, n={n_lora}): {'; '.join(parts)}.", ""]


def _additive(plan: dict) -> str:
  """'<parts>, <measured increase>' of a calibrated plan's first search step (the plan of the
  whole additive budget); '-' for a plan recorded without its search."""
  if not plan.get("search"):
    return "-"
  first = plan["search"][0]
  return f"{first['parts']}, {100 * first['increase']:+.2f}%"


def plot(results: dict, path: str) -> None:
  """Accuracy against training FLOPs per step (vs LoRA's mean), one point per run, a colour
  per run family (the name without its _s<seed>)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lora = [r["flops_per_step"] for n, r in results.items()
          if n.startswith("lora_s") and r.get("flops_per_step")]
  # FLOPs, not the logged step times: those were measured under varying background load.
  points = {n: r for n, r in results.items()
            if r.get("eval_accuracy") is not None and r.get("flops_per_step")}
  family = {n: family_of(n) for n in points}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for fam in sorted(set(family.values())):
    runs_ = [r for n, r in points.items() if family[n] == fam]
    x = [r["flops_per_step"] / (statistics.mean(lora) if lora else 1e12) for r in runs_]
    ax.scatter(x, [r["eval_accuracy"] for r in runs_], label=fam, s=30)
  ax.set_xlabel("training FLOPs per step vs LoRA" if lora else "training TFLOPs per step")
  ax.set_ylabel("exact-match accuracy (held-out)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_outputs(results: dict, ov: dict, cfg, seeds: int, out_dir: str,
                  plans: dict | None = None, budgets=()) -> str:
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, "sparselora_smollm2")
  results_commit = common.last_commit(stem + ".json")   # before it is rewritten
  plans = plans or {}
  runs.write_json(stem + ".json", {"runs": results, "overlap": ov, "budgets": list(budgets),
                                   "plans": {f"{b:g}": p for b, p in plans.items()}})
  with open(stem + ".md", "w") as f:
    # --runs / --report_only only decide what is trained now, not what the report holds
    argv = [a for a in sys.argv
            if not a.startswith(("--runs", "--report_only", "--noreport", "--from_json"))]
    speed = quiet_speedups(cfg, seeds, budgets, plans, base_shape(cfg), bench_records())
    f.write(report(results, ov, cfg, common.command_line(argv), seeds, results_commit, plans,
                   budgets, speed))
  plot(results, stem + ".png")
  page = os.path.relpath(os.path.abspath(stem + ".md"), common.REPO)
  if page == "docs/results/sparselora_smollm2.md":   # the repository's own page: its quote
    with open(stem + ".md", encoding="utf-8") as f:
      common.quote_tables(page, f.read())
  return stem + ".md"


def main(argv, flags):
  del argv
  cfg0 = flags.config
  if flags.from_json:   # re-render the page from a stored JSON (its runs and overlap)
    with open(flags.from_json) as f:
      page = json.load(f)
    plans = {float(b): p for b, p in page.get("plans", {}).items()}
    out = write_outputs(page["runs"], page["overlap"], cfg0, flags.seeds, flags.out_dir,
                        plans, page.get("budgets", ()))
    print(f"wrote {out}")
    return
  root = flags.workdir_root
  budgets = [float(b) for b in flags.budgets.split(",") if b.strip()]
  specs = run_specs(flags.seeds, budgets, root)
  only = [] if flags.report_only else ([s for s in flags.runs.split(",") if s] or list(specs))
  common.check_names(only, specs, "runs")

  store = flags.results_dir or os.path.join(flags.out_dir, "sparselora_smollm2_runs")

  def finished() -> dict:   # kept in the store for this code and config, or in the workdir
    out = {}
    for name in specs:
      kept = stored(store, name, apply(cfg0, specs[name]))
      path = os.path.join(root, name, RESULT_FILE)
      if kept is not None:
        out[name] = kept["result"]
      elif os.path.exists(path):   # a workdir's result of other code is not this code's
        with open(path) as f:
          result = json.load(f)
        if of_this_code(result):
          out[name] = result
    return out

  def plans() -> dict:
    out = {}
    for b in budgets:
      if os.path.exists(plan_path(root, b)):
        with open(plan_path(root, b)) as f:
          out[b] = json.load(f)
      elif (kept := stored(store, plan_name(b), apply(cfg0, {"seed": 0}))) is not None:
        out[b] = plan_of(kept)
    return out

  for name in only:   # in the order --runs lists them (default: run_specs' order)
    plan = specs[name].get("sparse.plan")
    if plan and stored(store, name, apply(cfg0, specs[name])) is None:
      # calibrated once, on the seed-0 config (or copied from the store)
      calibrated_plan(apply(cfg0, {"seed": 0}), root,
                      next(b for b in budgets if plan_path(root, b) == plan), store)
    result = one_run(apply(cfg0, specs[name]), os.path.join(root, name), store)
    print(f"{name}: {result}", flush=True)
    # The report is rewritten after every run: a half-finished sweep is readable.
    write_outputs(finished(), {}, cfg0, flags.seeds, flags.out_dir, plans(), budgets)
  ov_dir, ov_cfg = os.path.join(root, "sparselora_s0"), apply(cfg0, {"seed": 0})
  kept = stored(store, "overlap", ov_cfg)
  ov = kept["overlap"] if kept is not None else {}
  if not ov and flags.overlap and (not flags.report_only or os.path.exists(
      os.path.join(ov_dir, "overlap.json"))):
    ov = overlap(ov_cfg, ov_dir)
    store_record(store, "overlap", ov_cfg, overlap=ov)
  out = write_outputs(finished(), ov, cfg0, flags.seeds, flags.out_dir, plans(), budgets)
  print(f"wrote {out}", flush=True)


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/finetune.py:smollm2_135m_gsm",
                                  "configs/finetune.py:<preset>; --config.* apply to every run.",
                                  lock_config=False)
  flags.DEFINE_string("workdir_root", "/tmp/lost_jax_runs/sparselora_smollm2",
                      "Each run goes to <workdir_root>/<run>; finished runs are skipped.")
  flags.DEFINE_string("out_dir", "docs/results", "Where sparselora_smollm2.md/.json/.png go.")
  flags.DEFINE_string("results_dir", "", "Where finished results and calibrated plans are kept "
                      "as <run>.json / plan_b<budget>.json, reused by the same config and code "
                      "(default: <out_dir>/sparselora_smollm2_runs).")
  flags.DEFINE_integer("seeds", 3, "Seeds for LoRA, SparseLoRA and each plan.")
  flags.DEFINE_string("budgets", "0.02,0.05", "Loss budgets of the calibrated plans (`lost_jax."
                      "main calibrate --budget`), comma-separated; '' for none.")
  flags.DEFINE_string("runs", "", "Comma list of runs to do now, in this order (default all, "
                      "seed by seed); the others are reported if finished.")
  flags.DEFINE_bool("overlap", True, "Measure the estimator/oracle channel overlap.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the report from the finished runs.")
  flags.DEFINE_string("from_json", "", "Only rewrite the report from this stored JSON "
                      "(docs/results/sparselora_smollm2.json: the runs' results and overlap).")
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, main)
