"""The run's process-level plumbing: the workdir and clean stops on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal

import jax

from lost_jax.errors import UserError


class _StopFlag:
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
