"""lost_jax: LOST low-rank + channel-sparse pre-training and SparseLoRA fine-tuning in JAX/Flax.

Names and submodules load on first use, so the command line checks its settings (and prints
a bad one's error) before JAX is imported.
"""

import importlib

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
