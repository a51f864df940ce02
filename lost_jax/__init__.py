"""lost_jax: LOST low-rank + channel-sparse pre-training and SparseLoRA fine-tuning in JAX/Flax."""

from lost_jax.layers import (DenseLinear, LOSTLinear, LowRankLinear, SLTrainLinear,
                             StaticIndices, make_linear)
from lost_jax.lost import LostFactors, lost_split
from lost_jax.model import Llama

__all__ = [
    "DenseLinear", "LOSTLinear", "LowRankLinear", "SLTrainLinear", "StaticIndices",
    "make_linear", "LostFactors", "lost_split", "Llama",
]
__version__ = "0.1.0"
