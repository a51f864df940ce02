"""A run's process-level plumbing: config resolution and the mesh at start-up, the workdir
(config, checkpoints), and clean stops on SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import ml_collections

from lost_jax import configs
from lost_jax.errors import UserError
from lost_jax.parallel import sharding
from lost_jax.parallel.distributed import initialize_distributed
from lost_jax.training import checkpoint


class StopFlag:
  """When to leave the loop, save a checkpoint and exit cleanly after SIGTERM/SIGINT.

  One process: the signal sets a flag. Several: every process must stop at the same step,
  so JAX's preemption service (which owns SIGTERM there) propagates the notice to all of them
  and `reached(step)` is true on every process at the same step.
  """

  def __init__(self):
    self.stop = False
    self._old = {}
    self.multiprocess = jax.process_count() > 1

  def reached(self, step: int) -> bool:
    if self.multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.stop = self.stop or multihost_utils.reached_preemption_sync_point(step)
    return self.stop

  def __enter__(self):
    if self.multiprocess:
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. notebooks): no handler
        pass
    return self

  def _handle(self, *_):
    self.stop = True

  def __exit__(self, *_):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def make_workdir(workdir: str) -> None:
  """Create the run's directory, or refuse (one clear error) a path that cannot be one."""
  if not workdir:
    raise UserError("--workdir is empty. Fix: pass --workdir=<directory of this run>.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is an existing file, not a directory. Fix: give a "
                    "new directory path (re-using a run's directory resumes that run).")
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise PermissionError(13, "Permission denied", workdir)
  except OSError as e:
    raise UserError(f"--workdir={workdir} cannot be created or written ({e.strerror}). Fix: "
                    "give a writable directory path.") from e


def resolve_config(cfg: ml_collections.ConfigDict, command: str, *, validated: bool = False
                   ) -> ml_collections.FrozenConfigDict:
  """The run's config validated and resolved once, locked from then on.

  Validation runs before JAX starts a backend (skipped when the caller already ran
  `configs.validate`); a multi-process run joins its peers (`jax.distributed`) before the
  platform is read. A config already resolved passes through unchanged.
  """
  if configs.is_resolved(cfg):
    return cfg
  if not validated:
    configs.validate(cfg, command)
  if cfg.mesh.distributed:
    initialize_distributed(cfg.mesh)
  return configs.resolve(cfg, command, validated=True)


def make_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The run's device mesh, checked against its batch size and micro-batches."""
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.train.microbatches)
  return mesh


def start(cfg: ml_collections.ConfigDict, command: str
          ) -> tuple[ml_collections.FrozenConfigDict, jax.sharding.Mesh]:
  """`resolve_config` and `make_mesh`: how every recipe begins."""
  cfg = resolve_config(cfg, command)
  return cfg, make_mesh(cfg)


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The run's directory: its checkpointer and the fingerprint checkpoints must match."""
  path: str
  ckpt: checkpoint.Checkpointer
  fingerprint: dict


def open_workdir(workdir: str, cfg: ml_collections.ConfigDict, fingerprint: dict) -> RunDir:
  """Check the workdir's checkpoints fit this config, then record the resolved config."""
  make_workdir(workdir)
  ckpt = checkpoint.Checkpointer(workdir, every=cfg.train.ckpt_every,
                                 keep=cfg.train.keep_checkpoints)
  ckpt.check_compatible(fingerprint)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  return RunDir(workdir, ckpt, fingerprint)
