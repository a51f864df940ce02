"""Multi-process runtime: jax.distributed start-up and host agreement on compiled shapes."""

from __future__ import annotations

import threading
import time

import ml_collections
import numpy as np
import jax

from lost_jax import errors
from lost_jax.errors import UserError

_WAIT_REPORT_S = 10   # how often a start-up that waits for its peers says so


def initialize_distributed(mesh_cfg: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize with the config's coordinator / process count / id, where set
  ("" / -1: JAX detects the cluster). CPU processes exchange collectives through gloo."""
  if jax.distributed.is_initialized():
    return
  n, i = int(mesh_cfg.num_processes), int(mesh_cfg.process_id)
  if n == 0 or n < -1 or i < -1 or (n >= 0 and i >= n):
    raise UserError(f"config.mesh.num_processes={n}, process_id={i}: the id must be in "
                    "0..num_processes-1. Fix: e.g. --config.mesh.num_processes=2 "
                    "--config.mesh.process_id=0 (and 1 for the other), or -1 to detect both.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if mesh_cfg.coordinator_address:
    kwargs["coordinator_address"] = mesh_cfg.coordinator_address
  if mesh_cfg.num_processes >= 0:
    kwargs["num_processes"] = int(mesh_cfg.num_processes)
  if mesh_cfg.process_id >= 0:
    kwargs["process_id"] = int(mesh_cfg.process_id)
  timeout = int(mesh_cfg.get("init_timeout_s", 300))
  where = (f"coordinator {mesh_cfg.coordinator_address or '(detected)'}, process "
           f"{i if i >= 0 else '(detected)'} of {n if n >= 0 else '(detected)'}")
  done = threading.Event()
  watchdog = threading.Thread(target=_watch_start_up, args=(done, timeout, where), daemon=True)
  watchdog.start()
  try:   # JAX's own timeout (an abort in native code) comes after the watchdog's one line
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout + 60)
  finally:
    done.set()


def _watch_start_up(done: threading.Event, timeout: int, where: str) -> None:
  """Say every few seconds that start-up waits for the other processes; one error at the end."""
  start = time.time()
  wait = min(2.0, timeout / 2)   # a quick start-up says nothing; a slow one says so early
  while not done.wait(max(min(wait, timeout - (time.time() - start)), 0.1)):
    wait = _WAIT_REPORT_S
    waited = time.time() - start
    if waited >= timeout:
      errors.exit_now(
          f"multi-process start-up: not every process reached the {where} within "
          f"config.mesh.init_timeout_s={timeout} s. Fix: start all config.mesh.num_processes "
          "processes with the same coordinator_address (host:port of process 0, reachable "
          "from every host) and distinct process_id values, or raise init_timeout_s")
    print(f"start-up: waiting for the other processes ({where}; {waited:.0f} s of "
          f"{timeout} s)", flush=True)


def agree_max(values) -> tuple[int, ...]:
  """Each of `values` (host ints that decide a compiled shape) maxed over all processes."""
  values = np.asarray(values, np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    values = np.max(multihost_utils.process_allgather(values), axis=0)
  return tuple(int(v) for v in values)
