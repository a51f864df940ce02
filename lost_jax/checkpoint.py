"""Orbax checkpoints of a run: train state, static indices, grain iterator and run metadata.

Orbax writes each step into a temporary directory and renames it when complete, and deletes old
steps only after a newer one is finished, so a crash or kill never loses a finished checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

# Fingerprint entries a resumed run may change (the differences are printed); every other
# entry must match the checkpoint's.
MAY_CHANGE = ("schedule",)
# Data settings that do not change which examples a run sees.
_DATA_FREE = ("worker_count", "tfds_data_dir")


def model_fingerprint(cfg: ml_collections.ConfigDict, vocab_size: int) -> dict:
  """The settings that decide what a run (and so a resumed run) means.

  Must match on resume: model config, tokenizer vocab, sequence length, global batch, data
  source and files (all of config.data but worker_count / tfds_data_dir), seed and, for
  fine-tuning, the sparsity schedule (added by the caller). May change: the rest of
  config.train (learning rate, step count, ...), listed as `schedule`.
  """
  train_cfg = cfg.train.to_dict()
  fingerprint = {
      "model": cfg.model.to_dict(), "seq_len": cfg.data.seq_len,
      "tokenizer_vocab": int(vocab_size), "global_batch": int(train_cfg.pop("batch_size")),
      "data": {k: v for k, v in cfg.data.to_dict().items() if k not in _DATA_FREE},
      "seed": cfg.get("seed"), "schedule": train_cfg}
  return json.loads(json.dumps(fingerprint))   # as the checkpoint's JSON will read back


def compare_fingerprints(saved: dict, run: dict) -> tuple[list[str], list[str]]:
  """(differences that forbid a resume, differences a resume may have).

  Entries a checkpoint of an older version does not record are not compared.
  """
  refused, allowed = [], []
  for key in sorted(set(saved) & set(run)):
    (allowed if key in MAY_CHANGE else refused).extend(_diff(saved[key], run[key], key))
  return refused, allowed


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    return out
  return [] if old == new else [f"{prefix}: checkpoint {old!r} vs run {new!r}"]


class Checkpointer:
  """Saves and restores {state, rest, data, meta} under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "rest", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_compatible(self, fingerprint: dict) -> None:
    """Refuse (before anything is compiled or overwritten) a workdir of another model config."""
    step = self.latest_step()
    if step is None:
      return
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    diffs, allowed = compare_fingerprints(meta["meta"]["fingerprint"], fingerprint)
    if diffs:
      raise ValueError(
          f"workdir {os.path.dirname(self.directory)} holds checkpoints (step {step}) of a "
          "run with different settings:\n  " + "\n  ".join(diffs[:20]) +
          "\nFix: use a new --workdir, or the config that wrote these checkpoints "
          "(learning rate and step count may change on resume).")
    if allowed and jax.process_index() == 0:
      print(f"resuming step {step} with changed settings:\n  " + "\n  ".join(allowed),
            flush=True)

  def save(self, step: int, state, rest, data_iter, fingerprint: dict, *,
           force: bool = False) -> bool:
    # rest=None: frozen state that the run rebuilds itself (a fine-tune's base model).
    items = dict(state=ocp.args.StandardSave(state),
                 data=grain.checkpoint.CheckpointSave(data_iter),
                 meta=ocp.args.JsonSave({"step": int(step), "fingerprint": fingerprint}))
    if rest is not None and jax.tree.leaves(rest):   # dense models have no static indices
      items["rest"] = ocp.args.StandardSave(rest)
    args = ocp.args.Composite(**items)
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, abstract_rest, data_iter):
    """Restore into arrays with the shardings of the abstract trees; data_iter is set in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state),
                 data=grain.checkpoint.CheckpointRestore(data_iter))
    has_rest = abstract_rest is not None and jax.tree.leaves(abstract_rest)
    if has_rest:
      items["rest"] = ocp.args.StandardRestore(abstract_rest)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], (out["rest"] if has_rest else abstract_rest)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying target shardings, for a sharded Orbax restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
