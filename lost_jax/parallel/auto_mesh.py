"""`mesh.auto`: the (data, fsdp, tensor) mesh and micro-batch chosen so the step fits a device.

Pure arithmetic on the run config (`accounting.device_memory_estimate`, closed forms): nothing
is compiled. The rule, in order:
1. tensor = 1 unless no mesh fits without tensor parallelism (then 2, 4, 8: divisors of the
   device count and of the heads);
2. the fewest gradient-accumulation passes (the largest micro-batch) whose estimate fits
   `HEADROOM` of the device memory;
3. among those, the smallest fsdp (the most data parallelism): FSDP gathers the weights on
   every pass, data parallelism only reduces the gradients once a step.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from lost_jax.errors import UserError
from lost_jax.training import accounting

# The estimate may use this fraction of the device memory; the rest is left to XLA's
# workspace and what the closed form leaves out.
HEADROOM = 0.9
TENSOR_SIZES = (1, 2, 4, 8)
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Choice:
  """A mesh and a micro-batch: `rows` sequences per device per pass, `passes` passes a step."""
  data: int
  fsdp: int
  tensor: int
  passes: int
  rows: int
  estimate: int      # bytes per device (accounting.device_memory_estimate)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _estimate(cfg: ml_collections.ConfigDict, data: int, fsdp: int, tensor: int,
              passes: int) -> int:
  trial = ml_collections.ConfigDict(cfg.to_dict())
  trial.train.microbatches = passes
  return accounting.device_memory_estimate(trial, data, fsdp, tensor)["total"]


def options(cfg: ml_collections.ConfigDict, num_devices: int, tensor: int,
            budget: float) -> list[Choice]:
  """For every fsdp the batch divides over, the fewest passes whose estimate is <= budget."""
  out = []
  for fsdp in _divisors(num_devices // tensor):
    data = num_devices // (tensor * fsdp)
    shards = data * fsdp
    if cfg.train.batch_size % shards:
      continue
    per_device = cfg.train.batch_size // shards
    for passes in _divisors(per_device):
      est = _estimate(cfg, data, fsdp, tensor, passes)
      if est <= budget:
        out.append(Choice(data, fsdp, tensor, passes, per_device // passes, est))
        break
  return out


def choose(cfg: ml_collections.ConfigDict, num_devices: int, memory_bytes: float
           ) -> tuple[Choice, str]:
  """The mesh and micro-batch `mesh.auto` picks, and the one line that says what and why."""
  budget = HEADROOM * memory_bytes
  heads = math.gcd(cfg.model.n_heads, cfg.model.n_kv_heads)
  for tensor in TENSOR_SIZES:
    if num_devices % tensor or heads % tensor:
      continue
    found = options(cfg, num_devices, tensor, budget)
    if found:
      best = min(found, key=lambda c: (c.passes, c.fsdp))
      return best, _line(cfg, best, num_devices, memory_bytes)
  worst = _estimate(cfg, 1, num_devices, 1, cfg.train.batch_size // num_devices
                    ) if cfg.train.batch_size % num_devices == 0 else None
  need = f" (fsdp={num_devices}, 1 sequence per pass: {_size(worst)})" if worst else ""
  raise UserError(
      f"config.mesh.auto: no mesh of {_devices(num_devices)} fits the step in {HEADROOM:.0%} "
      f"of {_size(memory_bytes)} per device{need}. Fix: --config.model.remat=True, 8-bit "
      "optimizer states (--config.train.optimizer=adamw8bit), more devices, or a larger "
      "--config.mesh.memory_gib if the device has more.")


def _size(b: float) -> str:
  return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2 ** 20:.2f} MiB"


def _devices(n: int) -> str:
  return f"{n} device{'s' * (n != 1)}"


def _mesh_text(c: Choice) -> str:
  return f"data={c.data} fsdp={c.fsdp} tensor={c.tensor}"


def _line(cfg: ml_collections.ConfigDict, c: Choice, num_devices: int,
          memory_bytes: float) -> str:
  """'mesh.auto: data=.. fsdp=.. tensor=.., R sequences per device per pass x P passes:
  estimated X of Y GiB per device; <why not the next smaller fsdp>'."""
  why = ""
  smaller = [f for f in _divisors(num_devices // c.tensor) if f < c.fsdp]
  if smaller:           # data x fsdp is the same for every fsdp: the batch divides as well
    f = smaller[-1]
    need = _estimate(cfg, num_devices // (c.tensor * f), f, c.tensor, c.passes)
    why = f"; fsdp={f} would need {_size(need)}"
  elif c.passes > 1:
    need = _estimate(cfg, c.data, c.fsdp, c.tensor, c.passes // _smallest_factor(c.passes))
    why = f"; fewer passes would need {_size(need)}"
  return (f"mesh.auto: {_mesh_text(c)} on {_devices(num_devices)}, {c.rows} sequence"
          f"{'s' * (c.rows != 1)} per device per pass x {c.passes} pass"
          f"{'es' * (c.passes != 1)} (train.microbatches={c.passes}): estimated "
          f"{_size(c.estimate)} of {_size(memory_bytes)} per device{why}")


def _smallest_factor(n: int) -> int:
  return next(d for d in range(2, n + 1) if n % d == 0)


def apply(cfg: ml_collections.ConfigDict, num_devices: int, memory_bytes: float) -> str:
  """Set cfg.mesh.data / fsdp / tensor and cfg.train.microbatches to `choose`'s, in place;
  return its line."""
  c, line = choose(cfg, num_devices, memory_bytes)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = c.data, c.fsdp, c.tensor
  cfg.train.microbatches = c.passes
  return line


def device_memory(memory_gib: float) -> float:
  """Bytes per device for mesh.auto: mesh.memory_gib if set, else what the device reports."""
  if memory_gib:
    return memory_gib * GIB
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  limit = (stats or {}).get("bytes_limit")
  if not limit:
    raise UserError(f"config.mesh.auto: the {dev.platform} device reports no memory size. "
                    "Fix: give it, e.g. --config.mesh.memory_gib=16.")
  return float(limit)
