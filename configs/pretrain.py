"""Pre-training presets: `--config=configs/pretrain.py:<size>,<method>`.

Sizes: quickstart (tiny, CPU), llama_60m, llama_130m, llama_350m, llama_1b, llama_7b.
Methods: full_rank, lost, low_rank, cola, sltrain, galore.

Every field can be overridden from the command line, e.g.
`--config.model.linear.rank=64 --config.train.steps=100`.

Baseline rank rule (stated once, applied by `lost_jax.configs.matched_rank`): low_rank, cola
and sltrain get the rank r' whose total projection parameter count, summed over every
q/k/v/o/gate/up/down of the model, is closest to LOST's (LOST: r(n+m) + k*m per layer;
low_rank/cola: r'(n+m); sltrain: r'(n+m) + round(delta*n*m)). full_rank and galore are dense.
"""

from lost_jax import configs as _configs


def get_config(arg: str = "quickstart,lost"):
  size, _, method = arg.partition(",")
  return _configs.pretrain_config(size.strip(), (method or "lost").strip())
