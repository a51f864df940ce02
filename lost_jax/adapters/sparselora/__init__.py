"""SparseLoRA: contextual channel sparsity of the frozen base during LoRA training.

- `estimator`: offline low-rank estimators of the base kernels, SVD or activation-aware
  (build, save, load).
- `select`: channel scores and top-k selection (pure functions, static k).
- `restrict`: the base projections restricted to the chosen channels (gather / mask).
- `plan`: the static per-layer plan and each step's static lengths.
- `model`: the wiring into `Llama`'s forward (`LayerChannels`, `SparseLoRALlama`).
"""

from lost_jax.adapters.sparselora.estimator import (asvd_estimator, build_estimators,
                                                    load_estimators, save_estimators,
                                                    svd_estimator)
from lost_jax.adapters.sparselora.model import SparseLoRALlama, forward
from lost_jax.adapters.sparselora.plan import (SparsityPlan, StepLengths, plan_from_config,
                                               step_lengths)

__all__ = [
    "asvd_estimator",
    "build_estimators",
    "load_estimators",
    "save_estimators",
    "svd_estimator",
    "SparseLoRALlama",
    "forward",
    "SparsityPlan",
    "StepLengths",
    "plan_from_config",
    "step_lengths",
]
