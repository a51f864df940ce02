"""XLA:CPU defaults that lost_jax's entry points set before JAX starts.

XLA:CPU hands reductions to YNNPACK fusions by default; for this model's reductions (RMSNorm
and softmax statistics over one row, their backward sums) those run several times slower
than XLA's own loops: dropping them (`--xla_cpu_experimental_ynn_fusion_type=-reduce`; dots
stay with YNNPACK) made a SparseLoRA/LoRA train step ~7% faster on a 2-core x86 CPU and left a
full-rank pre-training step unchanged. The flag only concerns the CPU backend.

Entry points (`lost_jax.main`, the experiment scripts) call `configure()` before their first
JAX computation. A user's own XLA_FLAGS setting of the same option wins, and
`LOST_JAX_XLA_DEFAULTS=0` turns the defaults off.
"""

from __future__ import annotations

import os
from typing import MutableMapping

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)
OPT_OUT = "LOST_JAX_XLA_DEFAULTS"


def with_defaults(xla_flags: str, defaults=CPU_FLAGS) -> str:
  """XLA_FLAGS text with each default appended unless the same option is already set."""
  parts = xla_flags.split()
  names = {p.split("=", 1)[0] for p in parts}
  parts += [d for d in defaults if d.split("=", 1)[0] not in names]
  return " ".join(parts)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def configure(environ: MutableMapping[str, str] | None = None) -> bool:
  """Add the CPU defaults to XLA_FLAGS; False if opted out or JAX has already started.

  Must run before JAX initialises a backend (flags are read once, at that moment).
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1") == "0":
    return False
  if _backends_started():
    return False
  environ["XLA_FLAGS"] = with_defaults(environ.get("XLA_FLAGS", ""))
  return True
