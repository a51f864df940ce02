"""What a compiled XLA program holds and does: bytes per device, collectives, matmul dtypes.

Everything here reads a `jax.stages.Compiled` (or its HLO text), so it works ahead of time:
a step lowered on `jax.ShapeDtypeStruct`s compiles without one parameter being allocated.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp

GIB = 2 ** 30
PLATFORMS = ("cpu", "tpu")
# HLO opcodes that move data between devices (an async pair counts once, at its -start).
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_DOT = re.compile(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? dot\(")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(")


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of a pytree (shape x itemsize; ShapeDtypeStructs count too)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_bytes(compiled) -> dict[str, int]:
  """XLA's per-device buffer bytes of a compiled program; sum = argument + temp + output - alias."""
  stats = compiled.memory_analysis()
  out = dict(argument=stats.argument_size_in_bytes, temp=stats.temp_size_in_bytes,
             output=stats.output_size_in_bytes, alias=stats.alias_size_in_bytes,
             xla_peak=stats.peak_memory_in_bytes)
  out["sum"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
  return out


def device_total(row: dict, platform: str) -> int:
  """Peak bytes on the device: the buffer sum on CPU, the compiler's peak on TPU.

  XLA:CPU's `peak_memory_in_bytes` leaves temporaries out (it equals argument + output - alias
  in this jax version), so the CPU total is argument + temp + output - alias, an upper bound.
  The TPU compiler's peak comes from its heap simulation and is what HBM must hold.
  """
  return row["xla_peak"] if platform == "tpu" else row["sum"]


def dot_dtypes(hlo_text: str) -> dict[str, int]:
  """Count of dot instructions per result dtype in an HLO module's text."""
  return dict(collections.Counter(_DOT.findall(hlo_text)))


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Count of each collective opcode (COLLECTIVES) in an HLO module's text; absent ones are 0."""
  found = collections.Counter(_COLLECTIVE.findall(hlo_text))
  return {op: found[op] for op in COLLECTIVES}


def batch_all_gathers(hlo_text: str, seq_len: int, rows: int) -> list[str]:
  """All-gathers whose result is [.., rows, seq_len] shaped like the (micro-)batch."""
  out = []
  for dtype, dims in _ALL_GATHER.findall(hlo_text):
    shape = [int(d) for d in dims.split(",") if d]
    if len(shape) >= 2 and seq_len in shape and any(d >= rows for d in shape[:-1]):
      out.append(f"{dtype}[{dims}]")
  return out


def deviceless_tpu_env() -> None:
  """Compile for TPU without one: keep the CPU as jax's runtime backend and silence libtpu's
  search for TPU workers and a metadata server; several such compiling processes may run at
  once (libtpu's lock file is for processes that drive a TPU). Call before JAX starts."""
  import os  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_WORKER_ID", "0"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)


def topology_devices(topology: str) -> list:
  """Every chip of a deviceless TPU topology such as 'v5p:4x4x4' (needs the libtpu package)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"no TPU compiler for topology {topology!r} ({e}). Fix: "
                       "pip install 'libtpu==0.0.42.*' (jax[tpu]'s pin for jax 0.10.2) "
                       "or pass --platform=cpu.") from e
  return list(topo.devices)


def target_devices(platform: str, topology: str = "v5p:2x2x1") -> list:
  """One device to compile for: the host CPU, or one chip of a deviceless TPU topology."""
  if platform == "cpu":
    return jax.devices("cpu")[:1]
  if platform == "tpu":
    return topology_devices(topology)[:1]
  raise ValueError(f"platform={platform!r} is unknown. Fix: use one of {PLATFORMS}.")
