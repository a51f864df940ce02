"""A run's process-level plumbing: config resolution and the mesh at start-up, the workdir
(config, checkpoints), and clean stops on SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import socket
import tempfile

import jax
import ml_collections

from lost_jax import configs, errors, files
from lost_jax.errors import UserError
from lost_jax.parallel import auto_mesh, sharding
from lost_jax.parallel.distributed import initialize_distributed
from lost_jax.training import checkpoint, optim


class StopFlag:
  """When to leave the loop, save a checkpoint and exit cleanly after SIGTERM/SIGINT.

  One process: the signal sets a flag. Several: every process must stop at the same step,
  so JAX's preemption service (which owns SIGTERM there) propagates the notice to all of them
  and `reached(step)` is true on every process at the same step.
  """

  began = False   # whether a training loop has started in this process (the CLI's Ctrl-C line)

  def __init__(self):
    if errors.interrupted:   # a Ctrl-C during start-up that something swallowed
      raise KeyboardInterrupt
    self.stop = False
    self._old = {}
    self.multiprocess = jax.process_count() > 1

  def reached(self, step: int) -> bool:
    if self.multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.stop = self.stop or multihost_utils.reached_preemption_sync_point(step)
    return self.stop

  def __enter__(self):
    StopFlag.began = True
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


def make_workdir(workdir: str) -> str:
  """Create the run's directory (`~` expanded), or refuse (one clear error) a path that
  cannot be one; returns the path used."""
  if not workdir:
    raise UserError("--workdir is empty. Fix: pass --workdir=<directory of this run>.")
  workdir = os.path.expanduser(workdir)
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
  return workdir


def claim_workdir(workdir: str, steps: int | None = None) -> str:
  """Create the workdir and take its lock (process 0) first thing, before a base model or data
  is read: a second run on a live workdir is refused at once and writes nothing. With `steps`
  (train.steps), a workdir whose newest checkpoint is past it is refused too."""
  workdir = make_workdir(workdir)
  if jax.process_index() == 0:
    lock_workdir(workdir)
  if steps is not None:
    check_step_count(workdir, steps)
  return workdir


def check_writable(directory: str, what: str) -> None:
  """Create and remove a file in `directory` (made if missing): a save that would fail hours
  into a run fails at start-up instead."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise UserError(f"{what} {directory} is a file, not a directory. Fix: rename or remove "
                    "that file (it is no checkpoint), or give another --workdir.")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check."):
      pass
  except OSError as e:
    raise UserError(f"{what} {directory} cannot be written ({e.strerror or e}). Fix: make it "
                    "a writable directory (or give another --workdir); finished checkpoints "
                    "in it are kept.") from e


LOCK_FILE = ".lock"
_held_locks: dict[str, int] = {}   # real workdir path -> open descriptor holding its lock


def lock_workdir(workdir: str) -> None:
  """Hold the workdir's exclusive lock for the rest of this process (or `unlock_workdir`).

  The OS releases it when the process dies, so a lock left by a killed run is simply taken
  over; a live run's lock refuses the second run in one line naming its pid and host. One
  process may re-take a lock it holds (a notebook running the same workdir twice).
  """
  key = os.path.realpath(workdir)
  if key in _held_locks:
    return
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    os.close(fd)
    raise UserError(f"--workdir={workdir} is in use by a running lost_jax process ({holder}). "
                    "Fix: wait for it to finish or stop it (it saves a checkpoint on SIGTERM), "
                    "or give another --workdir.") from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
  _held_locks[key] = fd


def unlock_workdir(workdir: str) -> None:
  """Release the lock `lock_workdir` took (no-op if this process does not hold it)."""
  fd = _held_locks.pop(os.path.realpath(workdir), None)
  if fd is not None:
    os.close(fd)


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
    configs.expand_user_paths(cfg)
    configs.validate(cfg, command)
  if cfg.mesh.distributed:
    initialize_distributed(cfg.mesh)
  if cfg.mesh.get("auto", False):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    line = auto_mesh.apply(cfg, jax.device_count(), auto_mesh.device_memory(cfg.mesh.memory_gib))
    if jax.process_index() == 0:
      print(line, flush=True)
  return configs.resolve(cfg, command, validated=True)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The run's device mesh over all (or the given) devices, checked against its batch size
  and micro-batches."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.train.microbatches)
  return mesh


def start(cfg: ml_collections.ConfigDict, command: str, devices=None
          ) -> tuple[ml_collections.FrozenConfigDict, jax.sharding.Mesh]:
  """`resolve_config` and `make_mesh`: how every recipe begins."""
  cfg = resolve_config(cfg, command)
  return cfg, make_mesh(cfg, devices)


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The run's directory: its checkpointer, the fingerprint checkpoints must match, and the
  run config as resolved against its checkpoints (train.schedule_steps set)."""
  path: str
  ckpt: checkpoint.Checkpointer
  fingerprint: dict
  cfg: ml_collections.FrozenConfigDict | None = None


def check_step_count(workdir: str, steps: int) -> None:
  """Refuse a train.steps below the step of the workdir's newest checkpoint: the run would
  train nothing and label that checkpoint's weights with the smaller step."""
  saved = checkpoint.saved_steps(workdir)
  if saved and saved[-1] > steps:
    zero_shot = (" For the base alone (zero-shot, no adapters): `python -m lost_jax.main "
                 "evaluate --config=<the fine-tune's config> --workdir=<a new directory>`."
                 if steps == 0 else "")
    raise UserError(
        f"--workdir={workdir} holds a checkpoint of step {saved[-1]}, past "
        f"config.train.steps={steps}: nothing would be trained and its weights would be "
        f"labelled step {steps}. Fix: evaluate it with `python -m lost_jax.main evaluate "
        f"--workdir={workdir}` (--step=N for an older one), or pass "
        f"--config.train.steps above {saved[-1]} to train further.{zero_shot}")


def resumed_schedule(train: ml_collections.ConfigDict, saved: dict | None
                     ) -> tuple[int, str | None]:
  """(steps the lr schedule spans, a line saying what a resume does to it, or None).

  A fresh run's schedule spans train.steps. A resumed run that changes train.steps either
  rebuilds it over the new count (`train.extend=stretch`: the lr at the resumed step moves)
  or keeps the one its checkpoint was trained with (`constant`: steps past its end hold its
  final lr); the length is recorded in every checkpoint, so a later resume keeps it.
  """
  if saved is None:
    return int(train.steps), None
  fp = saved["fingerprint"]
  old = int(fp.get("schedule_steps") or fp.get("schedule", {}).get("steps") or train.steps)
  step, mode = int(saved["step"]), train.get("extend", "stretch")
  new = int(train.steps) if mode == "stretch" else old
  if new == old and train.steps <= old:
    return old, None
  lr = lambda length: float(optim.lr_schedule(train, length)(step))
  end_lr = train.lr * train.min_lr_ratio
  if new != old:
    return new, (f"lr schedule (train.extend=stretch): rebuilt over {new} steps instead of "
                 f"{old}, so the lr at the resumed step {step} moves from {lr(old):.3e} to "
                 f"{lr(new):.3e}. To keep the {old}-step schedule and hold its final lr "
                 f"{end_lr:.3e} for the added steps, pass --config.train.extend=constant.")
  return old, (f"lr schedule (train.extend=constant): the {old}-step schedule is kept; the lr "
               f"at the resumed step {step} stays {lr(old):.3e} and steps {old}..{train.steps} "
               f"hold its final lr {end_lr:.3e}.")


def open_workdir(workdir: str, cfg: ml_collections.ConfigDict, fingerprint: dict,
                 mesh: jax.sharding.Mesh, *, shared_data: bool = True) -> RunDir:
  """Lock the workdir (process 0: one run per workdir), check that its checkpoints fit this
  config and can be written, resolve the lr schedule's length against them
  (`resumed_schedule`), then record the resolved config.

  A checkpoint written on another mesh or process count resumes on `mesh` (one line says so);
  `shared_data=False` (each process streams its own files) refuses a new process count.

  The returned RunDir's cfg (train.schedule_steps set) is the one to train with, and its
  fingerprint (with schedule_steps) the one to save.
  """
  workdir = make_workdir(workdir)
  check_step_count(workdir, cfg.train.steps)
  if jax.process_index() == 0:
    lock_workdir(workdir)
    check_writable(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), "the checkpoint directory")
  ckpt = checkpoint.Checkpointer(workdir, every=cfg.train.ckpt_every,
                                 keep=cfg.train.keep_checkpoints,
                                 topology=checkpoint.topology(mesh), shared_data=shared_data)
  saved = ckpt.check_compatible(fingerprint)
  reshard = ckpt.resume_note(saved) if saved else None
  length, note = resumed_schedule(cfg.train, saved)
  cfg = configs.with_group(cfg, train=dict(cfg.train.to_dict(), schedule_steps=length))
  if jax.process_index() == 0:
    for line in (reshard, note):
      if line:
        print(line, flush=True)
    files.atomic_write(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))
  return RunDir(workdir, ckpt, {**fingerprint, "schedule_steps": length}, cfg)


def open_checkpoint(workdir: str, cfg: ml_collections.ConfigDict, step: int | None
                    ) -> tuple[checkpoint.Checkpointer, int]:
  """(the run's checkpointer, `step` or its newest checkpoint's), for reading only; a run
  without checkpoints or without that step is refused."""
  saved = checkpoint.saved_steps(workdir)
  if not saved:
    raise UserError(f"--workdir={workdir} has no checkpoint yet. Fix: train it first (the "
                    "pretrain or finetune command with this --workdir), or wait for its first "
                    "checkpoint (config.train.ckpt_every).")
  if step is None:
    step = saved[-1]
  elif step not in saved:
    raise UserError(f"--workdir={workdir} has no checkpoint of step {step} (saved: "
                    f"{', '.join(map(str, saved))}; older ones are deleted past "
                    f"config.train.keep_checkpoints). Fix: pass --step= one of those, or none "
                    "for the newest.")
  return checkpoint.Checkpointer(workdir, every=cfg.train.ckpt_every,
                                 keep=cfg.train.keep_checkpoints), step
