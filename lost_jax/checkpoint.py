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

# Fields that must match for a checkpoint to be restored into a run.
def model_fingerprint(cfg: ml_collections.ConfigDict, vocab_size: int) -> dict:
  """The settings that decide parameter shapes and meaning (model config + tokenizer vocab).

  model.perf is left out: a checkpoint written with one attention kernel or matmul backward
  (e.g. on a GPU) resumes with another (e.g. on a CPU).
  """
  model = {k: v for k, v in json.loads(cfg.model.to_json()).items() if k != "perf"}
  return {"model": model, "seq_len": cfg.data.seq_len,
          "tokenizer_vocab": int(vocab_size)}


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
    diffs = _diff(meta["meta"]["fingerprint"], fingerprint)
    if diffs:
      raise ValueError(
          f"workdir {os.path.dirname(self.directory)} holds checkpoints (step {step}) of a "
          "different model config:\n  " + "\n  ".join(diffs[:10]) +
          "\nFix: use a new --workdir, or the config that wrote these checkpoints.")

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
