"""lost_jax: LOST low-rank + channel-sparse pre-training and SparseLoRA fine-tuning in JAX/Flax.

Names and submodules load on first use, so the command line checks its settings (and prints
a bad one's error) before JAX is imported.
"""

import importlib
import os as _os
import signal as _signal

# A process the command line started (grain's data workers are spawned): Ctrl-C in a terminal
# signals the whole process group, and the training process stops its workers itself, so a
# worker ignores SIGINT from its first lost_jax import on (before JAX is imported) instead of
# printing a traceback of its own.
if _os.environ.get("LOST_JAX_CLI_PID", str(_os.getpid())) != str(_os.getpid()):
  try:
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
  except ValueError:   # imported off the main thread: not a worker's start-up
    pass

_EXPORTS = {
    "DenseLinear": "layers.linear", "LowRankLinear": "layers.linear",
    "SLTrainLinear": "layers.linear", "StaticIndices": "layers.linear",
    "LOSTLinear": "layers.lost", "LostFactors": "layers.lost", "lost_split": "layers.lost",
    "make_linear": "layers.factory", "Llama": "models.llama",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"lost_jax.{_EXPORTS[name]}"), name)
  try:
    return importlib.import_module(f"lost_jax.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"lost_jax.{name}":
      raise
    raise AttributeError(f"module 'lost_jax' has no attribute {name!r}") from None


def __dir__():
  return sorted(list(globals()) + __all__)
