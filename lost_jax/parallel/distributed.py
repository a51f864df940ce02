"""Multi-process runtime: jax.distributed start-up and host agreement on compiled shapes."""

from __future__ import annotations

import ml_collections
import numpy as np
import jax

from lost_jax.errors import UserError


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
  jax.distributed.initialize(**kwargs)


def agree_max(values) -> tuple[int, ...]:
  """Each of `values` (host ints that decide a compiled shape) maxed over all processes."""
  values = np.asarray(values, np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    values = np.max(multihost_utils.process_allgather(values), axis=0)
  return tuple(int(v) for v in values)
