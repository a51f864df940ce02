"""Does the compiled train step divide the work over a mesh? (8 fake CPU devices, AOT.)

Compiles the real train step (`lost_jax.train.make_train_step`, with gradient accumulation)
for one device and for an 8-device mesh (data=8, then fsdp=8), reads XLA's per-device
argument and temporary bytes (`compiled.memory_analysis()`), and counts all-gathers of the
batch in `compiled.as_text()`. Ratios near 1/8 mean the devices split the work; a ratio near
1 means every device holds (or computes) everything.

  python -m experiments.sharding_check --size=llama_60m --methods=full_rank,lost \\
      --microbatches=8 --out_md=docs/benchmarks/sharding.md
"""

from __future__ import annotations

import os
import shlex
import sys

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=g-import-not-at-top

from experiments import common  # pylint: disable=g-import-not-at-top
from lost_jax.measure import compiled as compiled_lib  # pylint: disable=g-import-not-at-top
from lost_jax.measure import step_memory  # pylint: disable=g-import-not-at-top
from lost_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
from lost_jax.recipes import pretrain  # pylint: disable=g-import-not-at-top

GIB = compiled_lib.GIB
MESHES = {"1 device": None, "data=8": (8, 1, 1), "fsdp=8": (1, 8, 1)}


def measure(size: str, method: str, mesh_name: str, *, microbatches: int,
            overrides: dict | None = None) -> dict:
  """Per-device argument/temp bytes, batch all-gathers and collectives of one compiled step."""
  cfg = step_memory.measurement_config(size, method, overrides=overrides)
  cfg.train.microbatches = microbatches
  shape = MESHES[mesh_name]
  devices = jax.devices()[:1] if shape is None else jax.devices()[:8]
  if shape is not None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
  setup = pretrain.make_setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  _, compiled = step_memory.compile_step(setup, cfg, step_memory.abstract_inputs(setup, cfg))
  stats = compiled_lib.memory_bytes(compiled)
  hlo = compiled.as_text()
  micro_rows = cfg.train.batch_size // microbatches // len(devices)
  gathers = compiled_lib.batch_all_gathers(hlo, cfg.data.seq_len, max(2, micro_rows + 1))
  return dict(size=size, method=method, mesh=mesh_name, argument=stats["argument"],
              temp=stats["temp"], batch_all_gathers=gathers,
              collectives=compiled_lib.collective_counts(hlo),
              global_batch=cfg.train.batch_size, seq_len=cfg.data.seq_len,
              microbatches=microbatches)


def run(size: str, methods, *, microbatches: int, overrides: dict | None = None,
        log=print) -> list[dict]:
  """measure() of every method on every mesh, with ratios to the method's 1-device step."""
  rows = []
  for method in methods:
    for mesh_name in MESHES:
      r = measure(size, method, mesh_name, microbatches=microbatches, overrides=overrides)
      rows.append(r)
      one = next(x for x in rows if x["method"] == method and x["mesh"] == "1 device")
      r["argument_ratio"] = r["argument"] / one["argument"]
      r["temp_ratio"] = r["temp"] / one["temp"]
      log(f"{size} {method:>9} {mesh_name:>8} | args {r['argument'] / GIB:7.3f} GiB "
          f"({r['argument_ratio']:.3f}x) | temp {r['temp'] / GIB:7.3f} GiB "
          f"({r['temp_ratio']:.3f}x) | batch all-gathers {len(r['batch_all_gathers'])}"
          + (f" e.g. {r['batch_all_gathers'][0]}" if r["batch_all_gathers"] else ""))
  return rows


def markdown(rows: list[dict], command: str, title: str) -> str:
  """A titled markdown table of run()'s rows."""
  lines = [f"### {title}", "", f"`{command}`", "", common.code_version_line(), "",
           "| size | method | mesh | arguments / device (GiB) | x 1 device | temporaries / "
           "device (GiB) | x 1 device | batch all-gathers |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    g = r["batch_all_gathers"]
    lines.append(f"| {r['size']} | {r['method']} | {r['mesh']} | {r['argument'] / GIB:.3f} | "
                 f"{r['argument_ratio']:.3f} | {r['temp'] / GIB:.3f} | {r['temp_ratio']:.3f} | "
                 f"{len(g)}{' (' + ', '.join(sorted(set(g))[:3]) + ')' if g else ''} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="llama_60m")
  p.add_argument("--methods", default="full_rank,lost")
  p.add_argument("--microbatches", type=int, default=8)
  p.add_argument("--title", default="lost_jax (this commit)")
  p.add_argument("--out_md", default="", help="append the table to this markdown file")
  args = p.parse_args(argv)
  rows = run(args.size, args.methods.split(","), microbatches=args.microbatches)
  if args.out_md:
    command = "python -m experiments.sharding_check " + shlex.join(argv)
    with open(args.out_md, "a") as f:
      f.write(markdown(rows, command, args.title) + "\n")


if __name__ == "__main__":
  common.code_version_line()   # the code this run starts on
  main(sys.argv[1:])
