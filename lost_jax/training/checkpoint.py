"""Orbax checkpoints of a run: train state, static indices, grain iterator and run metadata.

Orbax writes each step into a temporary directory and renames it when complete, and deletes old
steps only after a newer one is finished, so a crash or kill never loses a finished checkpoint.
A checkpoint damaged later (a truncated or missing file) is moved aside to
`<workdir>/checkpoints_damaged/` once an older one restores (`restore_latest`); nothing is
deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lost_jax import configs
from lost_jax.errors import UserError, mute_output, one_line, unmute_output

# Fingerprint entries a resumed run may change (the differences are printed); every other
# entry must match the checkpoint's.
MAY_CHANGE = ("schedule",)
# Data settings that do not change which examples a run sees.
_DATA_FREE = ("worker_count", "tfds_data_dir")
# Settings added after checkpoints were first written (fingerprint paths), with the value that
# does what those checkpoints did: a checkpoint that does not record one matches a run that has
# that value (ANY: every value, for settings such a run does not read). data.truncate is not
# here: before it, long prompts lost their end, which no value does now.
ANY = object()
ADDED_SETTINGS = {
    "model.linear.dense_init": "normal",
    "sparse.estimator": "svd", "sparse.estimator_tokens": "context",
    "sparse.block_input_grad": False, "sparse.plan": "",
    # read only by asvd estimators and a calibrated plan, which need the settings above
    "sparse.calibration_batches": ANY, "sparse.calibration_sparsities": ANY,
}


def model_fingerprint(cfg: ml_collections.ConfigDict, vocab_size: int) -> dict:
  """The settings that decide what a run (and so a resumed run) means.

  Must match on resume: model config, tokenizer vocab, sequence length, global batch, data
  source and files (all of config.data but worker_count / tfds_data_dir), seed and, for
  fine-tuning, the sparsity schedule (added by the caller). May change: the rest of
  config.train (learning rate, step count, ...), listed as `schedule`.
  """
  train_cfg = cfg.train.to_dict()
  train_cfg.pop("schedule_steps", None)   # resolved on resume: `fingerprint["schedule_steps"]`
  # model.perf and model.remat (configs.COMPUTE_SETTINGS) are left out: a checkpoint written
  # with one attention kernel, matmul backward or remat choice (e.g. on a GPU) resumes with
  # another (e.g. on a CPU). Architecture settings at their (LLaMA) defaults are left out
  # too, so checkpoints written before the settings existed still match.
  model = {k: v for k, v in cfg.model.to_dict().items()
           if k not in configs.COMPUTE_SETTINGS
           and not (k in configs.ARCH_DEFAULTS and v == configs.ARCH_DEFAULTS[k])}
  fingerprint = {
      "model": model, "seq_len": cfg.data.seq_len,
      "tokenizer_vocab": int(vocab_size), "global_batch": int(train_cfg.pop("batch_size")),
      "data": {k: v for k, v in cfg.data.to_dict().items() if k not in _DATA_FREE},
      "seed": cfg.get("seed"), "schedule": train_cfg}
  return json.loads(json.dumps(fingerprint))   # as the checkpoint's JSON will read back


def compare_fingerprints(saved: dict, run: dict) -> tuple[list[str], list[str]]:
  """(differences that forbid a resume, differences a resume may have).

  Entries a checkpoint of an older version does not record are not compared.
  """
  refused, allowed = [], []
  if isinstance(saved.get("model"), dict):   # older checkpoints recorded model.remat
    saved = dict(saved, model={k: v for k, v in saved["model"].items()
                               if k not in configs.COMPUTE_SETTINGS})
  for key in sorted(set(saved) & set(run)):
    diffs = _diff(saved[key], run[key], key)
    if key == "inputs":   # one entry per input that changed, not one per file of it
      diffs = _per_input(saved[key], run[key])
    (allowed if key in MAY_CHANGE else refused).extend(diffs)
  return refused, allowed


def _per_input(saved: dict, run: dict, shown: int = 2) -> list[str]:
  """`inputs.<name>: N of its files changed (path: checkpoint <signature> vs run <signature
  or absent>; ...)`, the first `shown` of them spelled out."""
  out = []
  for name in sorted(set(saved) | set(run)):
    old, new = saved.get(name) or {}, run.get(name) or {}
    changed = [f for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
    if changed:
      show = lambda sig: "absent" if sig is None else repr(sig)
      detail = "; ".join(f"{f}: checkpoint {show(old.get(f))} vs run {show(new.get(f))}"
                         for f in changed[:shown])
      more = f"; {len(changed) - shown} more" if len(changed) > shown else ""
      out.append(f"inputs.{name}: {len(changed)} file(s) differ from those the checkpoint "
                 f"was trained on ({detail}{more})")
  return out


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      path = f"{prefix}.{key}" if prefix else key
      if key not in old and path in ADDED_SETTINGS and ADDED_SETTINGS[path] in (ANY, new[key]):
        continue   # written before the setting existed, by a run that did what this one does
      out += _diff(old.get(key), new.get(key), path)
    return out
  return [] if old == new else [f"{prefix}: checkpoint {old!r} vs run {new!r}"]


ITEMS = ("state", "rest", "data", "meta")   # the Orbax items of every checkpoint step
# grain's name for one process's iterator state in the `data` item.
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


CHECKPOINT_DIR = "checkpoints"   # under the workdir


def saved_steps(workdir: str) -> list[int]:
  """The steps of a workdir's finished checkpoints, oldest first ([] when it has none);
  reads only the directory listing and creates nothing."""
  # No CheckpointManager: one makes multi-process barriers (root metadata), and a listing
  # must not, since processes may see the directory appear at different times.
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):   # none yet, or a file in its place (refused at open)
    return []
  return sorted(ocp.path.step.checkpoint_steps(directory))


def read_params(workdir: str) -> tuple[int | None, Any]:
  """(step, parameters as a pure tree of host arrays) of a workdir's newest checkpoint that
  reads; (None, None) when it has none. Reads nothing else (no optimizer state, no iterator)."""
  step, params, _ = read_saved(workdir)
  return step, params


def read_saved(workdir: str, step: int | None = None,
               log: Callable[[str], None] | None = None) -> tuple[int | None, Any, Any]:
  """(step, parameters, frozen rest or None) of a workdir's checkpoint `step` as pure trees of
  host arrays; (None, None, None) when it has no checkpoint. A step it does not hold is one
  error line naming the steps it does.

  `step=None` reads the newest checkpoint that reads: the run is read only (a base, an
  export), so a damaged newer checkpoint is reported in one line and skipped, never moved;
  when none reads, one UserError lists why each failed.
  """
  log = log or _print_on_main
  mgr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                              item_names=ITEMS)
  try:
    steps = sorted(mgr.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise UserError(f"workdir {workdir} has no checkpoint of step {step} (it has "
                      f"{', '.join(map(str, sorted(steps))) or 'none'}). Fix: pass --step= one "
                      "of those, or leave --step out for the newest")

    def restore(candidate):
      items = dict(state=ocp.args.StandardRestore())
      if os.path.isdir(os.path.join(mgr.directory, str(candidate), "rest")):
        items["rest"] = ocp.args.StandardRestore()
      saved = mgr.restore(candidate, args=ocp.args.Composite(**items))
      return saved["state"]["params"], saved.get("rest") if "rest" in items else None

    found, saved, failed = first_restorable([step] if step is not None else steps, restore)
  finally:
    mgr.close()
  if found is not None:
    for bad, reason in failed:
      log(f"checkpoint step {bad} of {workdir} is damaged ({reason}); using step {found}")
    return found, *saved
  if failed:
    raise UserError(
        f"no checkpoint of {workdir} can be read: " +
        "; ".join(f"step {s}: {r}" for s, r in failed) +
        ". Fix: point at a run with an intact checkpoint (or another --step); reading "
        "changes nothing in it.")
  return None, None, None


def first_restorable(steps: list[int], restore: Callable[[int], Any]
                     ) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """(step, restore(step)) of the first of `steps` that restores, with [(step, why)] of those
  before it that failed; (None, None, failed) when none does.

  Output is muted from before the first attempt: a failing restore's abandoned reads start
  printing as soon as orbax closes its event loop, before control returns here; some print
  from native threads past any Python hook, so the CLI (only) also mutes the output
  descriptors until a restore succeeds (its error line goes to the saved stderr).
  """
  failed = []
  if steps:
    _silence_abandoned_reads()
    mute_output()
  for step in steps:
    try:
      out = restore(step)
    except UserError:   # intact but not for this run (e.g. another process count): no damage
      unmute_output()
      raise
    except Exception as e:  # pylint: disable=broad-except  # any unreadable part
      failed.append((step, failure_reason(e)))
      continue
    unmute_output()
    return step, out, failed
  return None, None, failed


def topology(mesh: jax.sharding.Mesh) -> dict:
  """What a checkpoint records of the slice that wrote it: processes, devices, mesh sizes."""
  return {"processes": len({d.process_index for d in mesh.devices.flat}),
          "devices": int(mesh.devices.size), "mesh": {k: int(v) for k, v in mesh.shape.items()}}


def describe_topology(t: dict) -> str:
  """'8 devices (fsdp=8)', '2 processes with 2 devices (fsdp=2)': the mesh's axes above 1."""
  n, devices = t["processes"], t.get("devices")
  where = [f"{n} process{'es' * (n != 1)}"] if n > 1 or devices is None else []
  if devices is not None:
    where.append(f"{devices} device{'s' * (devices != 1)}")
  axes = ", ".join(f"{k}={v}" for k, v in t.get("mesh", {}).items() if v > 1)
  return " with ".join(where) + (f" ({axes})" if axes else "")


class Checkpointer:
  """Saves and restores {state, rest, data, meta} under `<workdir>/checkpoints`.

  `topology` (of the run's mesh) is recorded in every checkpoint's meta. `shared_data`: every
  process's data iterator holds the same (global) position, so a checkpoint written by any
  number of processes restores in any other; False (per-process file streams) refuses that.
  """

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True,
               topology: dict | None = None, shared_data: bool = True):
    self.topology, self.shared_data = topology, shared_data
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _meta(self, step: int) -> dict:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = meta["meta"]
    if not isinstance(meta, dict) or meta.get("step") != step or "fingerprint" not in meta:
      raise ValueError(f"its meta item does not describe step {step}")
    return meta

  def check_compatible(self, fingerprint: dict) -> dict | None:
    """Refuse (before anything is compiled or overwritten) a workdir of another model config.

    Checked against the newest checkpoint whose metadata reads (returned: {step,
    fingerprint}; None when there is none); a damaged one is left for `restore_latest` to
    report.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self._meta(step)
      except Exception:  # pylint: disable=broad-except
        continue
      diffs, allowed = compare_fingerprints(meta["fingerprint"], fingerprint)
      if diffs:
        raise UserError(
            f"workdir {os.path.dirname(self.directory)} holds checkpoints (step {step}) of a "
            "run with different settings or input files: " + "; ".join(diffs[:20]) +
            ". Fix: use a new --workdir, or the config and input files (base model, data) "
            "that wrote these checkpoints (learning rate and step count may change on "
            "resume).")
      if allowed and jax.process_index() == 0:
        print(f"resuming step {step} with changed settings:\n  " + "\n  ".join(allowed),
              flush=True)
      return meta
    return None

  def written_on(self, meta: dict) -> dict:
    """The topology that wrote the checkpoint of `meta`; a checkpoint of an older version
    records none, and gives only its process count (from its data files)."""
    if "topology" in meta:
      return meta["topology"]
    counts = {n for _, n in self._data_files(meta["step"])}
    return {"processes": counts.pop() if len(counts) == 1 else jax.process_count()}

  def resume_note(self, meta: dict) -> str | None:
    """One line when the checkpoint of `meta` was written on another mesh or process count
    (None when not); refused before anything is compiled when its data position is per
    process and the process count changed."""
    saved, now = self.written_on(meta), self.topology
    if now is None:
      return None
    if saved["processes"] != now["processes"] and not self.shared_data:
      raise _new_process_count(meta["step"], saved["processes"])
    if all(saved.get(k, now[k]) == now[k] for k in now):
      return None
    return (f"resuming a checkpoint written on {describe_topology(saved)} on "
            f"{describe_topology(now)} (parameters and optimizer state re-sharded; the same "
            "global batches follow)")

  def _data_files(self, step: int) -> list[tuple[int, int]]:
    """(process, count) of each `data/process_<i>-of-<n>.json` of a checkpoint step."""
    folder = epath.Path(self.directory) / str(step) / "data"
    found = [_DATA_FILE.fullmatch(p.name) for p in folder.iterdir()] if folder.exists() else []
    return sorted((int(m[1]), int(m[2])) for m in found if m)

  def _data_state(self, step: int) -> dict:
    """This process's data iterator state in checkpoint `step`: its own file, or (shared
    data, written by another process count) process 0's, which every process wrote alike."""
    folder = epath.Path(self.directory) / str(step) / "data"
    own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not own.exists():
      counts = sorted({n for _, n in self._data_files(step)})
      if len(counts) != 1:
        raise ValueError(f"its data item holds no iterator state for {jax.process_count()} "
                         f"processes (found: {counts or 'none'})")
      if not self.shared_data:
        raise _new_process_count(step, counts[0])
      own = folder / f"process_0-of-{counts[0]}.json"
    return json.loads(own.read_text())

  def save(self, step: int, state, rest, data_iter, fingerprint: dict, *,
           force: bool = False) -> bool:
    # rest=None: frozen state that the run rebuilds itself (a fine-tune's base model).
    items = dict(state=ocp.args.StandardSave(state),
                 data=grain.checkpoint.CheckpointSave(data_iter),
                 meta=ocp.args.JsonSave({"step": int(step), "fingerprint": fingerprint,
                                         **({"topology": self.topology}
                                            if self.topology else {})}))
    if rest is not None and jax.tree.leaves(rest):   # dense models have no static indices
      items["rest"] = ocp.args.StandardSave(rest)
    args = ocp.args.Composite(**items)
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, abstract_rest, data_iter):
    """Restore into arrays with the shardings of the abstract trees (those of this run's
    mesh, whatever mesh wrote them); data_iter is set in place (None: the data position is
    not read, as for an evaluation)."""
    self._meta(step)
    data_state = None if data_iter is None else self._data_state(step)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    has_rest = abstract_rest is not None and jax.tree.leaves(abstract_rest)
    if has_rest:
      items["rest"] = ocp.args.StandardRestore(abstract_rest)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:   # read directly: grain's handler wants this process count's file
      data_iter.set_state(data_state)
      data_iter.start_prefetch()
    return out["state"], (out["rest"] if has_rest else abstract_rest)

  def restore_latest(self, abstract_state, abstract_rest, data_iter,
                     log: Callable[[str], None] | None = None):
    """(step, state, rest) of the newest checkpoint that restores, or None when there is none.

    A newer checkpoint that fails to restore is reported in one line each and, once an older
    one has restored, moved to `<workdir>/checkpoints_damaged/`. When none restores nothing
    is moved and a UserError lists why each failed.
    """
    log = log or _print_on_main
    step, restored, failed = first_restorable(
        sorted(self.manager.all_steps(), reverse=True),
        lambda s: self.restore(s, abstract_state, abstract_rest, data_iter))
    if step is not None:
      for bad, reason in failed:
        log(f"checkpoint step {bad} is damaged ({reason}); moved it to "
            f"{self._move_aside(bad)} and resumed from step {step}")
      if failed:
        self.manager.reload()
      return step, *restored
    if failed:
      raise UserError(
          f"no checkpoint in {self.directory} can be restored: " +
          "; ".join(f"step {s}: {r}" for s, r in failed) +
          ". Fix: if the settings changed since they were written (train.optimizer, or "
          "train.clip_norm switched on or off), use the ones that wrote them; if the files are "
          "damaged, start again in a new --workdir (nothing here was moved or changed).")
    return None

  def _move_aside(self, step: int) -> str:
    """Move step's directory to <workdir>/checkpoints_damaged/<step>[.n] (never deleted)."""
    aside_root = self.directory + "_damaged"
    target = os.path.join(aside_root, str(step))
    n = 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(aside_root, f"{step}.{n}")
    if jax.process_index() == 0:
      os.makedirs(aside_root, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"lost_jax checkpoint {step} moved aside")
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _new_process_count(step: int, written_by: int) -> UserError:
  """The refusal of a per-process data position on another process count."""
  return UserError(
      f"checkpoint step {step} was written by {written_by} process(es), each streaming its own "
      f"data files (data.source=files), so its data position cannot be split over "
      f"{jax.process_count()}. Fix: resume with config.mesh.num_processes={written_by} (any "
      "mesh shape and device count), or start a new --workdir.")


def failure_reason(e: BaseException) -> str:
  """The root cause of a failed restore (e.g. tensorstore's OUT_OF_RANGE), on one line."""
  while e.__cause__ is not None:
    e = e.__cause__
  return one_line(f"{type(e).__name__}: {e}", 300)


def _silence_abandoned_reads() -> None:
  """Keep the reads a failed restore abandoned from printing a traceback each, later.

  Orbax leaves the other array reads of a failed restore running: each that fails afterwards
  prints 'Exception ignored in <coroutine ...>', and each that completes after orbax closed its
  event loop makes tensorstore print `RuntimeError: Event loop is closed` with a traceback.
  From the first restore attempt on, those two (and only those) are dropped.
  """
  if getattr(sys.unraisablehook, "lost_jax_filter", False):
    return
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is None or "orbax" not in code.co_filename:
      previous_unraisable(unraisable)

  def except_hook(kind, value, tb):
    if not _is_closed_loop_callback(value, tb):
      previous_except(kind, value, tb)

  unraisable_hook.lost_jax_filter = True
  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  # A task of an abandoned read that failed is logged when garbage-collected.
  logging.getLogger("asyncio").addFilter(_not_an_orbax_task_error)


def _not_an_orbax_task_error(record: logging.LogRecord) -> bool:
  """False for asyncio's 'Task exception was never retrieved' about an orbax coroutine."""
  message = record.getMessage()
  return not (message.startswith("Task exception was never retrieved") and "orbax" in message)


def _is_closed_loop_callback(value, tb) -> bool:
  """A RuntimeError('Event loop is closed') raised by asyncio's call_soon_threadsafe."""
  if not isinstance(value, RuntimeError) or str(value) != "Event loop is closed":
    return False
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def _print_on_main(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying target shardings, for a sharded Orbax restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
