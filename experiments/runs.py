"""Training runs cached by their full config and the code that made them.

`run(cfg, ...)` trains and evaluates a config once: its result is stored as `<key>.json`,
key = sha256 of the config (every field but `name`) and `code_version()` (a hash of the
lost_jax sources and this file, Python and library versions). A result is reused only by
the same config under the same code; a run interrupted under this code resumes from its
checkpoint in `<workdir_root>/<key>`. Changing the package therefore re-runs everything,
by design: a documented command never silently reproduces numbers of older code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable

import ml_collections

from lost_jax import errors
from lost_jax.training import accounting
from lost_jax.training import metrics
from lost_jax.recipes import pretrain

REQUEST_FILE = "experiment.json"  # the config and code version a workdir was started with


def _jsonable(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)   # a crash never leaves a half-written result behind


# Sources whose change can change a result: the package and this file (which trains,
# evaluates and summarises). Report code elsewhere only reads stored results, so it can
# change without invalidating them.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "grain", "numpy", "sentencepiece",
              "ml_collections")


def source_files(repo: str = _REPO) -> list[str]:
  """Repository-relative paths of the sources hashed into the code version, sorted."""
  pkg = os.path.join(repo, "lost_jax")
  files = [os.path.relpath(os.path.join(d, f), repo) for d, _, fs in os.walk(pkg)
           for f in fs if f.endswith(".py")]
  return sorted(files + [os.path.join("experiments", "runs.py")])


def hash_sources(files: Iterable[tuple[str, bytes]]) -> str:
  """sha256 (16 hex digits) over (path with '/', bytes) of each file, in the given order."""
  h = hashlib.sha256()
  for rel, data in files:
    h.update(rel.replace(os.sep, "/").encode() + b"\0" + data + b"\0")
  return h.hexdigest()[:16]


def sources_hash(repo: str = _REPO) -> str:
  """hash_sources over every file of source_files(), sorted by path."""
  def read(rel):
    with open(os.path.join(repo, rel), "rb") as f:
      return f.read()
  return hash_sources((rel, read(rel)) for rel in source_files(repo))


@functools.lru_cache(maxsize=None)
def code_version() -> dict:
  """What besides the config decides a result: the source hash, Python (the stdlib corpus
  is its library) and library versions. Read once per process, so a long sweep records the
  code it started with even if the files change under it."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  libs = {}
  for name in _LIBRARIES:
    try:
      libs[name] = importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
      libs[name] = "absent"
  return {"sources": sources_hash(), "python": platform.python_version(), **libs}


def keyed_config(cfg: ml_collections.ConfigDict) -> dict:
  """The config a result is keyed by: every field but `name` (a label, not a setting)."""
  out = _jsonable(cfg)
  out.pop("name", None)
  return out


def result_key(cfg: ml_collections.ConfigDict, version: dict) -> str:
  """sha256 (16 hex digits) of the full config and the code version."""
  blob = json.dumps({"config": keyed_config(cfg), "code": version}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_result(results_dir: str, cfg: ml_collections.ConfigDict,
                version: dict) -> dict | None:
  """The stored result of `cfg` made by code `version`, or None when there is none.

  A file under this key whose recorded config or code differs is refused (ValueError):
  a result is only ever reused by the exact config and code that made it.
  """
  key = result_key(cfg, version)
  path = os.path.join(results_dir, key + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  if stored.get("code_version") != version or stored.get("config") != keyed_config(cfg):
    raise ValueError(f"{path} was made by different code or a different config than the "
                     "one asked for; refusing to reuse it. Fix: delete the file and re-run.")
  return stored


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


class Store:
  """The finished results in `results_dir` made by code `version`, found by config.

  A result is found by its key (config and version) first. A result of older code may lack
  fields added to the config since: it is then found when every field it records equals the
  asked config's, and the fields it does not record are collected in `unrecorded` (a
  report names them). Two such matches for one config are refused (ValueError).
  """

  def __init__(self, results_dir: str, version: dict):
    self.results_dir, self.version = results_dir, version
    self.unrecorded: set[str] = set()
    self._older: list[tuple[dict, dict]] | None = None   # (flat config, result), read once

  def _older_results(self) -> list[tuple[dict, dict]]:
    if self._older is None:
      self._older = []
      names = sorted(os.listdir(self.results_dir)) if os.path.isdir(self.results_dir) else []
      for name in names:
        if name.endswith(".json"):
          with open(os.path.join(self.results_dir, name)) as f:
            r = json.load(f)
          if r.get("code_version") == self.version and "config" in r:
            self._older.append((_flat(r["config"]), r))
    return self._older

  def __call__(self, cfg: ml_collections.ConfigDict) -> dict | None:
    found = load_result(self.results_dir, cfg, self.version)
    if found is not None:
      return found
    want = _flat(keyed_config(cfg))
    hits = [(f, r) for f, r in self._older_results()
            if set(f) <= set(want) and all(want[k] == v for k, v in f.items())]
    if len(hits) > 1:
      raise ValueError(f"{len(hits)} results in {self.results_dir} match {cfg.name} on the "
                       f"fields they record ({', '.join(r['key'] for _, r in hits)}). Fix: "
                       "keep one of them.")
    if not hits:
      return None
    self.unrecorded |= set(want) - set(hits[0][0])
    return hits[0][1]


def latest_rows(workdir: str) -> list[dict]:
  """metrics.jsonl rows, keeping the last row per (step, kind) after a resumed run repeats one."""
  by_key = {}
  for row in metrics.read_metrics(workdir):
    by_key[(row["step"], "eval_ppl" in row)] = row
  return [by_key[k] for k in sorted(by_key)]


class Interrupted(Exception):
  """Training returned before its last step (SIGTERM/SIGINT saved a checkpoint): a rerun
  resumes it; nothing is stored as a result."""


def interrupted(name: str, steps: int, rows: list[dict], workdir: str) -> Interrupted:
  """The Interrupted of run `name` whose metrics `rows` end before its `steps`."""
  done = max((r["step"] for r in rows), default=0)
  return Interrupted(f"{name}: stopped at step {done} of {steps} by a signal; rerunning "
                     f"resumes from {workdir}")


def summarize(rows: list[dict], steps: int) -> dict:
  """Final eval metrics (the eval at `steps`), the eval and train-loss curves and the median
  logged training throughput."""
  final = [r for r in rows if "eval_ppl" in r and r["step"] == steps]
  if not final:
    raise RuntimeError(f"no evaluation at the final step {steps} in metrics.jsonl")
  speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
  out = {k: final[-1][k] for k in ("eval_loss", "eval_ppl", "eval_tokens")}
  # Median: the first logged window of each invocation also contains compilation.
  out["tokens_per_s"] = statistics.median(speeds) if speeds else float("nan")
  out["eval_curve"] = [[r["step"], r["eval_loss"], r["eval_ppl"]] for r in rows
                       if "eval_ppl" in r]
  out["loss_curve"] = [[r["step"], r["loss"]] for r in rows if "loss" in r]
  return out


def diverged_summary(rows: list[dict], message: str) -> dict:
  """The result of a run stopped by non-finite steps: infinite loss and perplexity, the
  curves up to the stop and the reason."""
  speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
  return dict(eval_loss=math.inf, eval_ppl=math.inf, eval_tokens=0.0,
              tokens_per_s=statistics.median(speeds) if speeds else math.nan,
              eval_curve=[[r["step"], r["eval_loss"], r["eval_ppl"]] for r in rows
                          if "eval_ppl" in r],
              loss_curve=[[r["step"], r["loss"]] for r in rows if "loss" in r],
              diverged=" ".join(message.split()))


def run(cfg: ml_collections.ConfigDict, workdir_root: str, *, results_dir: str | None = None,
        quiet: bool = True,
        measure: Callable[[ml_collections.ConfigDict], dict] | None = None) -> dict:
  """Train + evaluate `cfg`, or return the stored result made by this config and code.

  Results are `<results_dir>/<key>.json` (default: the run's workdir), key = result_key of
  the full config and code_version(); the run trains in `<workdir_root>/<key>`, so a run
  interrupted under this code resumes from its last checkpoint and a checkpoint or result of
  other code is never picked up. `measure(cfg)` adds fields (e.g. memory) to the result.
  """
  version = code_version()
  key = result_key(cfg, version)
  workdir = os.path.join(workdir_root, key)
  results_dir = results_dir or workdir
  stored = load_result(results_dir, cfg, version)
  if stored is not None:
    return stored
  want = {"config": keyed_config(cfg), "code_version": version}
  request = os.path.join(workdir, REQUEST_FILE)
  if os.path.exists(request):
    with open(request) as f:
      if json.load(f) != want:
        raise ValueError(f"{workdir} was started with a different config or code. Fix: "
                         f"delete {workdir}.")
  else:
    write_json(request, want)
  t0 = time.time()
  try:
    pretrain.train_and_evaluate(cfg, workdir, quiet=quiet)
    rows = latest_rows(workdir)
    if not any(r["step"] == cfg.train.steps and "eval_ppl" in r for r in rows):
      raise interrupted(cfg.name, cfg.train.steps, rows, workdir)
    summary = summarize(rows, cfg.train.steps)
  except errors.TrainingDiverged as e:   # a result too: this lr is too high for this method
    summary = diverged_summary(latest_rows(workdir), str(e))
  result = dict(name=cfg.name, key=key, steps=cfg.train.steps, seed=cfg.seed,
                params=accounting.count_params(cfg.model), wall_s=time.time() - t0,
                finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                **want, **summary)
  if measure is not None:
    result.update(measure(cfg))
  write_json(os.path.join(results_dir, key + ".json"), result)
  return result
