"""Peak host memory of loading a Hugging Face LLaMA checkpoint whole vs sliced onto a mesh.

Writes a random bfloat16 checkpoint of a preset's shape (sharded safetensors, one file per
layer, so writing it never holds the whole model), then loads it in fresh subprocesses and
reports each one's peak resident memory (resource.getrusage ru_maxrss) above the memory it
had before loading:
- `whole`: `hf.load_hf_llama(path, param_dtype=float32)` without a mesh (every tensor read
  whole onto one device: what fine-tuning did before);
- `sliced, N devices`: `finetune.load_base`'s path: `hf.load_hf_llama(..., mesh=fsdp N)` in
  bfloat16 (the frozen base under `mixed`), each device's slice read straight into its shard.
Fake CPU devices live in host memory, and safetensors memory-maps the files (pages read
count in the resident set), so in one process every row holds the whole model about twice
whatever the device count: the figures show the transient float32 copies of the old path, not
the per-host saving. With several processes each one reads (and maps) only its devices'
slices. Repeated runs vary by a few tenths of a GiB.

  python -m experiments.sharded_load --size=llama_1b --n_layers=8 --dir=/tmp/hf_1b
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

GIB = 2 ** 30


def make_checkpoint(size: str, n_layers: int, path: str) -> int:
  """A random bf16 HF checkpoint of the preset's widths; returns its parameter count."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from lost_jax import configs
  from lost_jax.formats import hf  # pylint: disable=g-import-not-at-top
  from lost_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  cfg = configs.model_config(size)
  cfg.n_layers = n_layers
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, hf.CONFIG_FILE), "w") as f:
    json.dump(hf.hf_config(cfg, dtype="bfloat16"), f)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  groups: dict[str, list[str]] = {}
  for name in hf.tensor_map(n_layers):
    key = name.split(".")[2] if name.startswith("model.layers.") else "other"
    groups.setdefault(key, []).append(name)
  weight_map, total = {}, 0
  for key, names in groups.items():
    file = f"model-{key}.safetensors"
    tensors = {}
    for name in names:
      attr, transpose = hf.tensor_map(n_layers)[name]
      shape = tuple(hf.get_path(model, attr).shape)
      shape = shape[::-1] if transpose else shape
      tensors[name] = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
      total += int(np.prod(shape))
      weight_map[name] = file
    save_file(tensors, os.path.join(path, file))
  with open(os.path.join(path, hf.INDEX_FILE), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return total


def load_once(path: str, mode: str, devices: int) -> dict:
  """In this (fresh) process: load and return peak RSS growth and what was loaded."""
  import jax  # pylint: disable=g-import-not-at-top

  from lost_jax import configs
  from lost_jax.formats import hf
  from lost_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  jax.devices()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  if mode == "whole":
    model = hf.load_hf_llama(path, dtype="bfloat16", param_dtype="float32")
  else:
    mesh_cfg = configs.pretrain_config("quickstart", "full_rank").mesh
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, devices, 1
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices])
    model = hf.load_hf_llama(path, dtype="bfloat16", param_dtype="bfloat16", mesh=mesh)
  leaves = jax.tree.leaves(jax.tree.map(lambda v: v, model))
  jax.block_until_ready(leaves)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  kernel = model.layers[0].mlp.up.kernel[...]
  return dict(mode=mode, devices=devices, peak_growth=peak - before,
              model_bytes=sum(x.nbytes for x in leaves if hasattr(x, "nbytes")),
              shard_shape=list(kernel.sharding.shard_shape(kernel.shape)),
              kernel_shape=list(kernel.shape))


def measure(path: str, mode: str, devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  code = ("import json, sys; from experiments.sharded_load import load_once; "
          f"print('RESULT' + json.dumps(load_once({path!r}, {mode!r}, {devices})))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.split("RESULT", 1)[1])


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="llama_1b")
  p.add_argument("--n_layers", type=int, default=8)
  p.add_argument("--dir", default="/tmp/lost_jax_hf_1b")
  args = p.parse_args(argv)
  n = make_checkpoint(args.size, args.n_layers, args.dir)
  print(f"checkpoint: {args.size} widths, {args.n_layers} layers, {n / 1e6:.0f}M parameters, "
        f"{2 * n / GIB:.2f} GiB bf16 in {args.dir}")
  for mode, devices in (("whole", 1), ("sliced", 1), ("sliced", 8)):
    r = measure(args.dir, mode, devices)
    print(f"{mode:>6} onto {devices} device(s): peak host memory growth "
          f"{r['peak_growth'] / GIB:.2f} GiB, model {r['model_bytes'] / GIB:.2f} GiB "
          f"({r['peak_growth'] / r['model_bytes']:.2f}x), up kernel {r['kernel_shape']} -> "
          f"shard {r['shard_shape']} per device")


if __name__ == "__main__":
  main(sys.argv[1:])
