"""The real train step compiled ahead of time for TPU pod slices, without a TPU.

For each row (slice, size, method, optimizer-state width, mesh) the pre-training step of the
`<size>,<method>` preset (global batch 512 x 256 tokens, gradient accumulation over
micro-batches; `training.steps.make_train_step`, the step the trainer compiles) is lowered on
abstract inputs for every chip of a deviceless TPU topology
(`jax.experimental.topologies.get_topology_desc`) and compiled by the TPU compiler (libtpu).
Nothing is allocated and no TPU is used. The layers run as one scanned block
(model.perf.layer_loop=scan) so compile time does not grow with depth.

Per chip: XLA's argument / temporary bytes and the compiler's peak against the chip's HBM,
searched over a few micro-batch sizes for the largest that fits. Per step: FLOPs, bytes and
collectives read from the compiled HLO with every loop body weighted by its trip count
(`lost_jax.measure.hlo`; `cost_analysis()` counts a body once), the compiler's own
`optimal_seconds` scaled the same way, and a roofline from published chip figures.

Needs libtpu (`pip install 'libtpu==0.0.42.*'`, jax 0.10.2's pin). Rows are cached in
--out_json as they finish (a re-run resumes) and the page is rewritten after each row:

  python -m experiments.pod_scale --out_json=docs/benchmarks/pod_scale.json \\
      --out_md=docs/benchmarks/pod_scale.md --out_png=docs/benchmarks/pod_scale.png
  python -m experiments.pod_scale --sizes=llama_7b --slices=v5p-128 --max_rows=1  # one row
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Callable

from experiments import common
from lost_jax import configs
from lost_jax.measure import compiled as compiled_lib
from lost_jax.measure import hlo
from lost_jax.measure.compiled import GIB
from lost_jax.training import accounting



@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: HBM (GiB), bf16 peak (FLOP/s), HBM and ICI bandwidth (B/s)."""
  name: str
  hbm_gib: float
  peak_flops: float
  hbm_bw: float
  ici_bw: float
  source: str


# cloud.google.com/tpu/docs/v5p and /v5e (key specifications). ICI: the bidirectional
# per-chip figure (v5p 1200 GB/s = 4800 Gbps each way; v5e 400 GB/s = 1600 Gbps each way).
CHIPS = {
    "v5p": Chip("TPU v5p", 95, 459e12, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v5e": Chip("TPU v5e", 16, 197e12, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
}
# slice name -> (topology for get_topology_desc, chip)
SLICES = {"v5p-8": ("v5p:2x2x1", "v5p"), "v5p-128": ("v5p:4x4x4", "v5p"),
          "v5e-256": ("v5e:16x16", "v5e")}
# The meshes a user would pick per slice: (data, fsdp, tensor).
MESHES = {
    "v5p-8": {"fsdp": (1, 4, 1), "data x fsdp": (2, 2, 1), "fsdp x tensor": (1, 2, 2)},
    "v5p-128": {"fsdp": (1, 64, 1), "data x fsdp": (4, 16, 1), "fsdp x tensor": (1, 16, 4)},
    "v5e-256": {"fsdp": (1, 256, 1), "data x fsdp": (16, 16, 1), "fsdp x tensor": (1, 64, 4)},
}
# A row whose mesh and micro-batch are mesh.auto's pick (parallel/auto_mesh.py): its compile
# checks that the closed-form choice fits.
AUTO = "mesh.auto"
METHODS = ("full_rank", "lost")
STATE_BITS = (32, 8)
# Micro-batch search: compile at most this many sizes per row.
MAX_COMPILES = 3
# The TPU compiler's refusal of a step that does not fit, e.g. "Used 120.3G of 95.74G hbm".
_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")
_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: where (slice, mesh) and what (size, method, optimizer-state bits)."""
  slice: str
  size: str
  method: str
  bits: int
  mesh: str
  loop: str = "scan"      # model.perf.layer_loop

  @property
  def key(self) -> str:
    tail = "" if self.loop == "scan" else f"|{self.loop}"
    return f"{self.slice}|{self.size}|{self.method}|{self.bits}|{self.mesh}{tail}"

  @property
  def shape(self) -> tuple[int, int, int]:
    if self.mesh == AUTO:
      c = self.auto_choice()
      return (c.data, c.fsdp, c.tensor)
    return MESHES[self.slice][self.mesh]

  def compile_key(self, rows_per_chip: int) -> str:
    """What a compile depends on: a mesh picked by mesh.auto reuses a named mesh's compile."""
    tail = "" if self.loop == "scan" else f"|{self.loop}"
    return (f"{self.slice}|{self.size}|{self.method}|{self.bits}|"
            f"{'x'.join(map(str, self.shape))}|{rows_per_chip}{tail}")

  def auto_choice(self):
    """mesh.auto's pick for this slice's chips and HBM (on the compiled settings)."""
    from lost_jax.parallel import auto_mesh  # pylint: disable=g-import-not-at-top
    cfg = configs.pretrain_config(self.size, self.method)
    cfg.model.perf.layer_loop = self.loop
    if self.bits == 8:
      cfg.train.optimizer += "8bit"
    return auto_mesh.choose(cfg, self.chips, self.chip.hbm_gib * GIB)[0]

  @property
  def chips(self) -> int:
    return math.prod(next(iter(MESHES[self.slice].values())))

  @property
  def chip(self) -> Chip:
    return CHIPS[SLICES[self.slice][1]]


MESH_NAMES = ("fsdp", AUTO, "data x fsdp", "fsdp x tensor")


def plan(slices=tuple(SLICES), sizes=("llama_7b", "llama_1b"), methods=METHODS,
         bits=STATE_BITS, meshes=MESH_NAMES, unrolled: bool = True) -> list[Row]:
  """Rows in the order they are measured, 7B at 64 and 256 chips first: pure FSDP with 32-bit
  states, then 8-bit, mesh.auto's pick, the other meshes (32-bit), the same FSDP rows with
  the layers unrolled (compile time and memory against scan), the other meshes with 8-bit
  states; then 4 chips; then 1B."""
  def tier(r: Row) -> int:
    if r.size != "llama_7b":
      return 7
    if r.slice == "v5p-8":
      return 6
    if r.loop == "unrolled":
      return 4
    if r.mesh == "fsdp":
      return 0 if r.bits == 32 else 1
    if r.bits == 32:
      return 2 if r.mesh == AUTO else 3
    return 5

  rows = [Row(s, z, m, b, mesh) for s in slices for z in sizes for m in methods for b in bits
          for mesh in meshes if mesh in MESHES[s] or mesh == AUTO]
  if unrolled:
    rows += [dataclasses.replace(r, loop="unrolled") for r in rows
             if r.size == "llama_7b" and r.slice != "v5p-8" and r.mesh == "fsdp"
             and r.bits == 32]
  return sorted(rows, key=lambda r: (tier(r), list(SLICES).index(r.slice),
                                     MESH_NAMES.index(r.mesh), r.bits, METHODS.index(r.method)))


def row_config(row: Row, rows_per_chip: int):
  """The `<size>,<method>` preset on row's mesh with `rows_per_chip` sequences per chip per
  pass (train.microbatches = the passes), 8-bit states if asked, row's layer loop, resolved
  for TPU."""
  from lost_jax.measure import step_memory  # pylint: disable=g-import-not-at-top
  data, fsdp, tensor = row.shape
  cfg = step_memory.measurement_config(
      row.size, row.method, microbatch=rows_per_chip * data * fsdp, eight_bit=row.bits == 8,
      overrides={"model.perf.layer_loop": row.loop})
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
  configs.resolve_perf(cfg.model, "tpu")
  return cfg


def preset_batch(size: str) -> tuple[int, int]:
  """(global batch in sequences, tokens per sequence) of a size's presets."""
  cfg = configs.pretrain_config(size, "full_rank")
  return cfg.train.batch_size, cfg.data.seq_len


def micro_batches(row: Row) -> list[int]:
  """Per-chip micro-batch sizes (powers of two) that divide the global batch's rows per chip,
  ascending."""
  if row.mesh == AUTO:
    return [row.auto_choice().rows]
  data, fsdp, _ = row.shape
  per_chip = preset_batch(row.size)[0] // (data * fsdp)
  return [r for r in range(1, per_chip + 1) if per_chip % r == 0 and r & (r - 1) == 0]


def first_guess(row: Row) -> int:
  """The largest micro-batch the closed-form per-chip estimate fits in 90% of HBM."""
  sizes = micro_batches(row)
  fits = [r for r in sizes
          if accounting.device_memory_estimate(row_config(row, r), *row.shape)["total"]
          <= 0.9 * row.chip.hbm_gib * GIB]
  return fits[-1] if fits else sizes[0]


def oom_bytes(message: str) -> tuple[float, float] | None:
  """(bytes used, bytes available) of the TPU compiler's out-of-HBM refusal, if it is one."""
  m = _OOM.search(message)
  if not m:
    return None
  return float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]


def compile_row(row: Row, rows_per_chip: int, devices: list, hlo_dir: str = "") -> dict:
  """Compile row's step for `devices` at `rows_per_chip`: memory, compiler costs, HLO costs
  (the compiled HLO text gzipped into `hlo_dir` if given)."""
  # pylint: disable=g-import-not-at-top
  from lost_jax.measure import step_memory
  from lost_jax.parallel import sharding
  from lost_jax.recipes import pretrain
  cfg = row_config(row, rows_per_chip)
  out = dict(rows_per_chip=rows_per_chip, microbatches=cfg.train.microbatches,
             estimate=accounting.device_memory_estimate(cfg, *row.shape),
             perf=dict(cfg.model.perf), version=common.code_version_line())
  t0 = time.time()
  setup = pretrain.make_setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  inputs = step_memory.abstract_inputs(setup, cfg)
  try:
    _, compiled = step_memory.compile_step(setup, cfg, inputs)
  except Exception as e:  # pylint: disable=broad-except
    used = oom_bytes(str(e))
    out.update(fits=False, peak=used[0] if used else 0.0, compile_s=time.time() - t0)
    # Not an out-of-HBM refusal: the compiler failed; the row records why.
    out["refusal" if used else "error"] = str(e).splitlines()[0][:300]
    return out
  out["compile_s"] = time.time() - t0
  out.update(compiled_lib.memory_bytes(compiled))
  out["peak"] = out["xla_peak"]
  out["fits"] = out["peak"] <= row.chip.hbm_gib * GIB
  cost = compiled.cost_analysis()
  out["compiler"] = {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds")
                     if k in cost}
  text = compiled.as_text()
  if hlo_dir:
    import gzip  # pylint: disable=g-import-not-at-top
    os.makedirs(hlo_dir, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", row.compile_key(rows_per_chip)) + ".hlo.gz"
    with gzip.open(os.path.join(hlo_dir, name), "wt") as f:
      f.write(text)
  weighted, once = hlo.step_costs(text, row.chips, row.chip.peak_flops, row.chip.hbm_bw)
  out["hlo"], out["hlo_once"] = weighted.as_dict(), once.as_dict()
  return out


def estimates(row: Row, m: dict) -> dict:
  """Per-step figures of a compile: model FLOPs; the compiler's time scaled by the loops' trip
  counts (None when the compiler's optimal_seconds is not positive), its tokens/s and MFU; the
  HLO's per-instruction roofline time and MFU; and the totals' roofline terms (seconds)."""
  cfg = row_config(row, m["rows_per_chip"])
  tokens = cfg.train.batch_size * cfg.data.seq_len
  model_flops = (accounting.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
                 / row.chips)
  chip = row.chip
  w, once = m["hlo"], m["hlo_once"]
  # The compiler's estimate counts each loop body once; scale it by the ratio of the
  # per-instruction roofline with bodies x trip count to the same with bodies once.
  scale = w["seconds"] / once["seconds"]
  optimal = m["compiler"].get("optimal_seconds", 0.0)
  step_s = optimal * scale if optimal > 0 else None
  # The HLO walker does not see the FLOPs inside custom calls (the splash-attention kernel):
  # the compute term takes the larger of its FLOPs and the model's.
  compute_s, hbm_s, ici_s = (max(w["flops"], model_flops) / chip.peak_flops,
                             w["bytes"] / chip.hbm_bw, w["ici_bytes"] / chip.ici_bw)
  mfu = lambda seconds: model_flops / seconds / chip.peak_flops if seconds else None
  return dict(model_flops=model_flops, tokens=tokens, loop_scale=scale, step_s=step_s,
              tokens_per_s=tokens / step_s if step_s else None, mfu=mfu(step_s),
              hlo_step_s=w["seconds"], hlo_mfu=mfu(w["seconds"]),
              compute_s=compute_s, hbm_s=hbm_s, ici_s=ici_s,
              roofline_s=max(compute_s, hbm_s, ici_s),
              roofline_mfu=mfu(max(compute_s, hbm_s, ici_s)),
              flops_check=once["flops"] / m["compiler"]["flops"],
              bytes_check=once["bytes"] / m["compiler"]["bytes accessed"])


def search(row: Row, devices: list, cache: dict, save: Callable[[], None],
           log: Callable[[str], None] = print, hlo_dir: str = "") -> dict:
  """Compile `row` at a few micro-batch sizes (cached in cache['compiles']) and return the
  row: the largest size that fits, with its measurements, and every size tried."""
  sizes = micro_batches(row)
  tried: dict[int, dict] = {}
  r = first_guess(row)
  while r not in tried and len(tried) < MAX_COMPILES:
    key = row.compile_key(r)
    if key not in cache["compiles"]:
      log(f"{row.key}: compiling at {r} sequence(s) per chip per pass ...")
      cache["compiles"][key] = compile_row(row, r, devices, hlo_dir)
      save()
    m = tried[r] = cache["compiles"][key]
    if "error" in m:
      log(f"{row.key}: the compile failed at {r}: {m['error']}")
      break
    log(f"{row.key}: micro-batch {r} x {m['microbatches']} passes: peak "
        f"{m['peak'] / GIB:.2f} GiB of {row.chip.hbm_gib} ({'fits' if m['fits'] else 'does not fit'})"
        f", compiled in {m['compile_s']:.0f} s")
    i = sizes.index(r)
    if m["fits"] and i + 1 < len(sizes):
      r = sizes[i + 1]
    elif not m["fits"] and i > 0:
      r = sizes[i - 1]
  fitting = [s for s, m in tried.items() if m["fits"]]
  best = max(fitting) if fitting else min(tried)
  largest_known = bool(fitting) and (best == sizes[-1] or (
      sizes.index(best) + 1 < len(sizes) and sizes[sizes.index(best) + 1] in tried))
  out = dict(dataclasses.asdict(row), key=row.key, chips=row.chips, shape=row.shape,
             chip=row.chip.name, hbm_gib=row.chip.hbm_gib, max_rows_per_chip=sizes[-1],
             largest_fit=best if fitting else 0, largest_known=largest_known,
             tried={str(s): dict(peak=m["peak"], fits=m["fits"], compile_s=m["compile_s"])
                    for s, m in sorted(tried.items())},
             **tried[best])
  return out


def load(path: str) -> dict:
  """The JSON cache ({'compiles': {...}, 'rows': {...}}), empty if absent."""
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {"compiles": {}, "rows": {}}


def write_json(path: str, cache: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(cache, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def run(rows: list[Row], cache: dict, save: Callable[[], None], on_row: Callable[[], None],
        log: Callable[[str], None] = print, hlo_dir: str = "") -> None:
  """Measure every row not yet in cache['rows'], saving and reporting after each."""
  from lost_jax import progress  # pylint: disable=g-import-not-at-top
  devices = {}
  todo = [r for r in rows if r.key not in cache["rows"]]
  for row in progress.track(todo, "pod_scale rows", unit="row"):
    topology = SLICES[row.slice][0]
    if topology not in devices:
      devices[topology] = compiled_lib.topology_devices(topology)
    cache["rows"][row.key] = search(row, devices[topology], cache, save, log, hlo_dir)
    save()
    on_row()


def main(argv, flag_values) -> None:
  """Measure the asked rows (resuming from --out_json), rewrite the page after each."""
  del argv
  from experiments import pod_scale_report as report  # pylint: disable=g-import-not-at-top
  f = flag_values
  common.check_names(f.slices, SLICES, "slice")
  common.check_names(f.methods, METHODS, "method")
  rows = plan(tuple(f.slices), tuple(f.sizes), tuple(f.methods),
              tuple(int(b) for b in f.bits), tuple(f.meshes), f.unrolled)
  if f.max_rows:
    rows = rows[:f.max_rows]
  cache = load(f.out_json)
  # The command that measures (and, re-run, resumes): without --report_only.
  command = " ".join(a for a in common.command_line().split(" ") if a != "--report_only")

  def save():
    if f.out_json:
      write_json(f.out_json, cache)

  def on_row():
    if f.out_md:
      report.write_markdown(f.out_md, command, cache, f.out_png)
    if f.out_png:
      report.plot(cache, f.out_png)

  if not f.report_only:
    compiled_lib.deviceless_tpu_env()
    run(rows, cache, save, on_row, hlo_dir=f.hlo_dir)
  on_row()
  print("\n".join(report.summary_lines(cache)))


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("slices", list(SLICES), f"TPU slices ({', '.join(SLICES)}).")
  flags.DEFINE_list("sizes", ["llama_7b", "llama_1b"], "Model sizes (configs.SIZES).")
  flags.DEFINE_list("methods", list(METHODS), "Methods.")
  flags.DEFINE_list("bits", ["32", "8"], "Optimizer-state widths: 32 (adamw) or 8 "
                    "(adamw8bit).")
  flags.DEFINE_list("meshes", list(MESH_NAMES), f"Meshes per slice (MESHES, and {AUTO!r}: "
                    "the mesh and micro-batch mesh.auto picks for the chip's HBM).")
  flags.DEFINE_bool("unrolled", True, "Also the 7B pure-FSDP 32-bit rows at 64 and 256 "
                    "chips with model.perf.layer_loop=unrolled (compile time, memory).")
  flags.DEFINE_integer("max_rows", 0, "Measure at most this many rows of the plan (0: all).")
  flags.DEFINE_bool("report_only", False, "Rewrite the page from --out_json, compile nothing.")
  flags.DEFINE_string("out_json", "", "Cache of every compile and row (resumable).")
  flags.DEFINE_string("hlo_dir", "", "Also keep each compiled step's HLO text here (gzip).")
  flags.DEFINE_string("out_md", "", "Write the markdown page here.")
  flags.DEFINE_string("out_png", "", "Write the plot here.")
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, main)
