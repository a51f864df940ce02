"""The page, plot and summary lines of experiments/pod_scale.py, from its JSON cache alone."""

from __future__ import annotations

import os

from experiments import common
from experiments.pod_scale import AUTO, CHIPS, SLICES, Row, estimates, plan, preset_batch
from lost_jax.measure.compiled import GIB

_KINDS = (("all-gather", "AG"), ("reduce-scatter", "RS"), ("all-reduce", "AR"))


def ordered(cache: dict) -> list[dict]:
  """The finished rows in table order (slice, size, mesh, bits, method), each with its per-
  step estimates (`pod_scale.estimates`, recomputed here from the row's raw measurements)."""
  order = {r.key: i for i, r in enumerate(sorted(
      plan(), key=lambda r: (list(SLICES).index(r.slice), r.size, r.mesh, r.bits, r.method)))}
  rows = []
  for r in sorted(cache["rows"].values(), key=lambda r: order.get(r["key"], len(order))):
    if "hlo" in r:
      row = Row(r["slice"], r["size"], r["method"], r["bits"], r["mesh"],
                r.get("loop", "scan"))
      r = dict(r, **estimates(row, r))
    rows.append(r)
  return rows


def gib(b: float) -> str:
  return f"{b / GIB:.2f}"


def _mesh(r: dict) -> str:
  d, f, t = r["shape"]
  text = " x ".join(f"{n}={s}" for n, s in (("data", d), ("fsdp", f), ("tensor", t)) if s > 1)
  text = f"{AUTO}: {text}" if r["mesh"] == AUTO else text
  return text + (", unrolled layers" if r.get("loop", "scan") != "scan" else "")


def _states(r: dict) -> str:
  return "8-bit" if r["bits"] == 8 else "32-bit"


def _fit(r: dict) -> str:
  if not r["largest_fit"]:
    return f"none (>= 1 does not fit; peak at 1: {gib(r['peak'])})"
  more = "" if r["largest_known"] else "+"
  cap = " (whole batch)" if r["largest_fit"] == r["max_rows_per_chip"] else ""
  return f"{r['largest_fit']}{more}{cap}"


def memory_table(rows: list[dict]) -> str:
  """Per-chip bytes of each row at its largest fitting micro-batch."""
  header = ["slice (chips)", "size", "method", "states", "mesh", "micro-batch / chip x passes",
            "arguments", "temp", "**peak** / HBM", "estimate", "fits", "largest micro-batch "
            "that fits", "compile s"]
  body = []
  for r in rows:
    if "error" in r:
      body.append([f"{r['slice']} ({r['chips']})", r["size"], r["method"], _states(r),
                   _mesh(r), f"{r['rows_per_chip']} x {r['microbatches']}",
                   f"compile failed: {r['error'][:120]}"] + ["-"] * 6)
      continue
    peak = f"**{gib(r['peak'])}** / {r['hbm_gib']}"
    arg = gib(r["argument"]) if "argument" in r else "-"
    tmp = gib(r["temp"]) if "temp" in r else "-"
    body.append([f"{r['slice']} ({r['chips']})", r["size"], r["method"], _states(r), _mesh(r),
                 f"{r['rows_per_chip']} x {r['microbatches']}", arg, tmp, peak,
                 gib(r["estimate"]["total"]), "yes" if r["fits"] else "**no**", _fit(r),
                 f"{r['compile_s']:.0f}"])
  return common.markdown_table(header, body)


def _coll(r: dict, kind: str) -> str:
  h = r["hlo"]
  text = f"{h['collective_count'][kind]:.0f} / {gib(h['collective_bytes'][kind])}"
  if kind == "all-reduce" and h.get("padded_gathers"):
    text += f" (gathers {h['padded_gathers']:.0f} / {gib(h['padded_gather_bytes'])})"
  return text


def step_time(r: dict) -> tuple[float, str]:
  """(seconds, source) of a row's estimated step: the compiler's, or where it gave none the
  HLO per-instruction roofline."""
  if r.get("step_s"):
    return r["step_s"], "compiler"
  return r["hlo_step_s"], "HLO roofline"


def _opt(value, fmt: str) -> str:
  return "n/a" if value is None else format(value, fmt)


def time_table(rows: list[dict]) -> str:
  """Per-step FLOPs, bytes, collectives, the compiler's estimate and the roofline terms."""
  header = ["slice", "size", "method", "states", "mesh", "TFLOP / chip (model)",
            "HBM GiB / chip"] + [f"{a} count / GiB" for _, a in _KINDS] + [
            "est. step s (compiler) *", "est. tokens/s *", "est. MFU *",
            "HLO roofline s / MFU *", "totals roofline s: compute / HBM / ICI", "its MFU"]
  body = []
  for r in rows:
    if "hlo" not in r:
      continue
    h = r["hlo"]
    body.append([r["slice"], r["size"], r["method"], _states(r), _mesh(r),
                 f"{h['flops'] / 1e12:.1f} ({r['model_flops'] / 1e12:.1f})",
                 f"{h['bytes'] / GIB:.0f}"] + [_coll(r, k) for k, _ in _KINDS] + [
                 _opt(r["step_s"], ".3f"), _opt(r["tokens_per_s"], ",.0f"),
                 "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                 f"{r['hlo_step_s']:.3f} / {100 * r['hlo_mfu']:.1f}%",
                 f"{r['compute_s']:.3f} / {r['hbm_s']:.3f} / {r['ici_s']:.3f}",
                 f"{100 * r['roofline_mfu']:.1f}%"])
  return common.markdown_table(header, body)


def pairs(rows: list[dict], field: str = "method", a: str = "full_rank", b: str = "lost"
          ) -> list[tuple[dict, dict]]:
  """(row, row) pairs that differ only in `field` (a, then b): by default (full_rank, lost)
  on the same slice, size, states, mesh and layer loop."""
  same = lambda r: tuple((k, r.get(k, "scan")) for k in ("slice", "size", "bits", "mesh",
                                                         "method", "loop") if k != field)
  by = {(same(r), r.get(field, "scan")): r for r in rows}
  return [(r, by[(k, b)]) for (k, v), r in by.items() if v == a and (k, b) in by]


def _same_source(a: dict, b: dict) -> tuple[tuple[float, str], tuple[float, str]]:
  """Both rows' step times from one source: the compiler's if both have it, else the HLO
  roofline's."""
  if a.get("step_s") and b.get("step_s"):
    return (a["step_s"], "compiler"), (b["step_s"], "compiler")
  return (a["hlo_step_s"], "HLO roofline"), (b["hlo_step_s"], "HLO roofline")


def compare_table(rows: list[dict]) -> str:
  """LOST / full-rank per-chip peak and estimated step time on every shared setting."""
  header = ["slice", "size", "states", "mesh", "peak GiB full-rank / LOST", "LOST x full-rank",
            "est. step s full-rank / LOST *", "LOST x full-rank *", "time from",
            "collective GiB full-rank / LOST"]
  body = []
  for f, l in pairs(rows):
    if "hlo" not in f or "hlo" not in l:
      continue
    coll = lambda r: sum(r["hlo"]["collective_bytes"].values())
    (tf, src), (tl, _) = _same_source(f, l)
    body.append([f["slice"], f["size"], _states(f), _mesh(f),
                 f"{gib(f['peak'])} / {gib(l['peak'])}", f"{l['peak'] / f['peak']:.2f}",
                 f"{tf:.3f} / {tl:.3f}", f"{tl / tf:.2f}", src,
                 f"{gib(coll(f))} / {gib(coll(l))}"])
  return common.markdown_table(header, body)


def loop_table(rows: list[dict]) -> str:
  """Scanned against unrolled layers on the same row: memory, compile time, collectives."""
  header = ["slice", "size", "method", "states", "mesh", "peak GiB scan / unrolled",
            "temp GiB scan / unrolled", "compile s scan / unrolled",
            "collective GiB scan / unrolled", "est. step s scan / unrolled *"]
  body = []
  for s_, u in pairs(rows, "loop", "scan", "unrolled"):
    if "hlo" not in s_ or "hlo" not in u:
      continue
    coll = lambda r: sum(r["hlo"]["collective_bytes"].values())
    body.append([s_["slice"], s_["size"], s_["method"], _states(s_), _mesh(s_),
                 f"{gib(s_['peak'])} / {gib(u['peak'])}", f"{gib(s_['temp'])} / {gib(u['temp'])}",
                 f"{s_['compile_s']:.0f} / {u['compile_s']:.0f}",
                 f"{gib(coll(s_))} / {gib(coll(u))}",
                 " / ".join(f"{t:.3f}" for t, _ in _same_source(s_, u))])
  return common.markdown_table(header, body) if body else ""


def summary_lines(cache: dict) -> list[str]:
  """The closing note: 7B LOST vs full-rank at 64 and 256 chips (pure FSDP), computed."""
  rows = [r for r in ordered(cache) if "hlo" in r]
  out = []
  for f, l in pairs(rows):
    if f["size"] != "llama_7b" or f["mesh"] != "fsdp" or f["chips"] < 64 or \
       f.get("loop", "scan") != "scan":
      continue
    coll = lambda r: sum(r["hlo"]["collective_bytes"].values()) / GIB
    (tf, src), (tl, _) = _same_source(f, l)
    mfu = lambda r, t: r["model_flops"] / t / CHIPS[SLICES[r["slice"]][1]].peak_flops
    what = ("the compiler's estimated" if src == "compiler" else
            "the HLO roofline's (the compiler's optimal_seconds is negative here)")
    out.append(
        f"- {f['size']} on {f['slice']} ({f['chips']} chips, {_mesh(f)}, {_states(f)} states): "
        f"per-chip peak full-rank {gib(f['peak'])} GiB vs LOST {gib(l['peak'])} GiB "
        f"({l['peak'] / f['peak']:.2f}x) of {f['hbm_gib']} GiB HBM; collectives per step "
        f"{coll(f):.1f} vs {coll(l):.1f} GiB per chip; {what} MFU "
        f"{100 * mfu(f, tf):.1f}% vs {100 * mfu(l, tl):.1f}% and step "
        f"{tf:.3f} vs {tl:.3f} s ({tl / tf:.2f}x), "
        f"estimates, not measurements. Activations are {_act(f)}% (full-rank) and {_act(l)}% "
        f"(LOST) of the closed-form per-chip estimate at {f['rows_per_chip']} sequences per "
        "chip per pass.")
  return out


def _act(r: dict) -> str:
  e = r["estimate"]
  return f"{100 * e['activations'] / e['total']:.0f}"


def _versions(cache: dict) -> str:
  """The code version(s) the rows were measured on, and this page's writer's if it differs
  (a page rewritten from the JSON by --report_only)."""
  lines = sorted({r.get("version", "") for r in cache["rows"].values()} - {""})
  now = common.code_version_line()
  if not lines:
    return now
  head = "\n".join(lines)
  if lines != [now]:
    head += ("\n\nPage written from the rows' JSON (the command with --report_only) on: "
             + now[0].lower() + now[1:])
  return head


def chip_lines() -> list[str]:
  return [f"- {c.name}: {c.hbm_gib} GiB HBM, {c.peak_flops / 1e12:.0f} TFLOP/s bf16 peak, HBM "
          f"{c.hbm_bw / 1e9:.0f} GB/s, ICI {c.ici_bw / 1e9:.0f} GB/s per chip (bidirectional); "
          f"published at {c.source}" for c in CHIPS.values()]


def markdown(cache: dict, command: str, image: str = "") -> str:
  rows = ordered(cache)
  checks = [r["flops_check"] for r in rows if "flops_check" in r]
  byte_checks = [r["bytes_check"] for r in rows if "bytes_check" in r]
  no_time = sorted({r["slice"] for r in rows if "hlo" in r and r["step_s"] is None})
  unknown = sum(r["hlo"]["unknown_loops"] for r in rows if "hlo" in r)
  batch, seq_len = preset_batch("llama_7b")
  lines = [
      "# The train step on TPU pod slices, compiled ahead of time (no TPU)", "",
      common.page_head(command, _versions(cache)),
      f"{len(rows)} row{'s' * (len(rows) != 1)}. Global batch {batch} x {seq_len} tokens (the presets'), "
      "train.precision mixed, model.perf resolved for TPU with model.perf.layer_loop=scan "
      "(rows marked 'unrolled layers': unrolled); "
      "compiled by the TPU compiler for every chip of a deviceless topology "
      "(jax.experimental.topologies). **Every time, tokens/s and MFU figure marked * is the "
      "compiler's estimate, not a measurement**; nothing ran on a TPU.", "",
  ]
  if image:
    lines += [f"![per-chip peak and estimated MFU]({image})", ""]
  lines += ["## Memory per chip", "", memory_table(rows), "",
            "## Per step: FLOPs, HBM bytes, collectives, estimated time", "", time_table(rows),
            "", "## LOST against full-rank", "", compare_table(rows), ""]
  loops = loop_table(rows)
  if loops:
    lines += ["## Scanned against unrolled layers", "", loops, ""]
  summary = summary_lines(cache)
  if summary:
    lines += ["## Closing note (computed from the rows above)", ""] + summary + [""]
  lines += [
      "## How the numbers are made", "",
      "- **Compiled**: `training.steps.make_train_step` of the `<size>,<method>` preset, the "
      "step the trainer compiles (gradient accumulation as a scan over micro-batches, global-"
      "norm clipping, AdamW or 8-bit AdamW), lowered on `jax.ShapeDtypeStruct`s carrying the "
      "step's shardings for a (data, fsdp, tensor) mesh over the topology's chips.",
      "- **Memory**: `compiled.memory_analysis()` per chip: arguments (parameters, optimizer "
      "state, indices, the batch shard), temporaries, and **peak** = the TPU compiler's heap "
      "peak, against the chip's HBM. A step that does not fit is refused by the compiler "
      "(\"Used X of Y hbm\"); that X is the peak shown. **estimate** = "
      "`accounting.device_memory_estimate` (closed form, what `mesh.auto` uses).",
      "- **Largest micro-batch that fits**: per-chip sequences per pass, powers of two "
      "dividing the global batch's rows per chip, searched up from the closed-form guess (at "
      f"most a few compiles per row); `+` = the next size was not tried, `(whole batch)` = "
      "the global batch in one pass already fits (a larger micro-batch needs a larger global "
      "batch). The row's other columns are measured at that size.",
      "- **Scanned layers** (model.perf.layer_loop=scan) keep the compile time flat in depth; "
      "their stacked copy of the blocks' parameters and gradients adds temporaries that the "
      "unrolled loop does not have (docs/benchmarks/memory_tpu.md: +30% / +46% peak on one "
      "chip at 1B); under FSDP that copy is split over the chips like the parameters.",
      "- **Loops counted by trip count**: `cost_analysis()` adds a while loop's body once. "
      "The accumulation scan (passes), the layer scans (forward and backward) and the fused "
      "loss's chunk loop are loops, so FLOPs, bytes and collectives here are read from the "
      "compiled HLO by `lost_jax.measure.hlo.step_costs`, which weights every loop body by its "
      "trip count (read from the loop's condition). FLOPs: dots and convolutions only "
      "(the Pallas splash-attention kernel is a custom call and not counted); the "
      "model column is `accounting.train_flops_per_token` x tokens / chips (6N + attention, "
      "the MFU numerator). With bodies counted once, the walker's FLOPs are "
      + (f"{min(checks):.3f}-{max(checks):.3f}x" if checks else "-")
      + " the compiler's own `flops` (elementwise FLOPs are the rest)"
      + (f"; {unknown} loop(s) had no readable trip count and count once." if unknown else
         "; every loop's trip count was read."),
      "- **est. step s (compiler) \\***: the compiler's `optimal_seconds` (bodies once) x the "
      "ratio of the HLO roofline with bodies x trip count to the same with bodies once. It "
      "does not include collectives. **est. tokens/s** = global batch tokens / that time; "
      "**est. MFU** = model FLOPs per chip / time / bf16 peak."
      + (f" n/a: the compiler returned a negative `optimal_seconds` ({', '.join(no_time)}"
         " compiles); there the LOST / full-rank comparison and the plot use the HLO roofline."
         if no_time else ""),
      "- **HLO roofline \\***: per instruction outside fusions, max(FLOPs / bf16 peak, bytes / "
      "HBM bandwidth), summed with every loop body x its trip count (`hlo.step_costs`); "
      "no collectives. The walker's bytes (operands and results at fusion boundaries, slices "
      "and in-place updates as read and written, async copies once each way) are "
      + (f"{min(byte_checks):.2f}-{max(byte_checks):.2f}x" if byte_checks else "-")
      + " the compiler's own `bytes accessed` with bodies once.",
      "- **Totals roofline**: compute = the larger of the walker's and the model's FLOPs / "
      "bf16 peak; HBM = walker bytes / HBM bandwidth; ICI = ring bytes of the collectives / "
      "ICI bandwidth ((n-1)/n of each all-gather / reduce-scatter, 2(n-1)/n of each "
      "all-reduce over its n chips). Their max is a lower bound on the step time if "
      "everything overlapped; **its MFU** uses that max.",
      "- **Collectives**: count and bytes per step per chip (all-gather: the gathered result; "
      "reduce-scatter and all-reduce: the full operand). The TPU compiler emits a reduce-"
      "scatter as an all-reduce inside an `all-reduce-scatter` fusion, counted as RS; and "
      "some FSDP weight gathers as an all-reduce of a zero array with the chip's shard "
      "written in (`gathers` in the AR column, `hlo.padded_shard`): counted, and costed in "
      "the ICI term, as the all-reduces they are.",
      "- **compile s**: wall time of setup + lower + compile of the row's step on a shared "
      "2-core host (other jobs running); compare rows, not absolute speed.",
      "", "Published chip figures used:", ""] + chip_lines() + [""]
  return "\n".join(lines)


def write_markdown(path: str, command: str, cache: dict, png: str = "") -> None:
  image = os.path.relpath(png, os.path.dirname(path) or ".") if png else ""
  with open(path, "w") as f:
    f.write(markdown(cache, command, image))


def plot(cache: dict, path: str) -> None:
  """Per-chip peak (of HBM) and the compiler's estimated MFU, full-rank vs LOST per setting."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  done = [(f, l) for f, l in pairs(ordered(cache)) if "hlo" in f and "hlo" in l]
  if not done:
    return
  labels = [f"{f['slice']}\n{f['size'][6:]} {_states(f)}\n{_mesh(f)}" for f, _ in done]
  fig = Figure(figsize=(max(8.0, 1.1 * len(done)), 6.5))
  FigureCanvasAgg(fig)
  ax1, ax2 = fig.subplots(2, 1, sharex=True)
  x = range(len(done))
  for off, i, name in ((-0.2, 0, "full-rank"), (0.2, 1, "LOST")):
    ax1.bar([v + off for v in x], [100 * p[i]["peak"] / GIB / p[i]["hbm_gib"] for p in done],
            0.4, label=name)
    bars = ax2.bar([v + off for v in x], [100 * (p[i]["mfu"] or p[i]["hlo_mfu"])
                                          for p in done], 0.4, label=name)
    for bar, p in zip(bars, done):
      if p[i]["mfu"] is None:       # no compiler estimate: the HLO roofline's, hatched
        bar.set_hatch("//")
  ax1.axhline(100, color="k", lw=0.8)
  ax1.set_ylabel("peak, % of the chip's HBM")
  ax2.set_ylabel("estimated MFU %\n(compiler; hatched: HLO roofline)")
  ax2.set_xticks(list(x), labels, fontsize=7)
  ax1.legend()
  ax1.set_title("Train step per chip, compiled for TPU slices (estimates, not measurements)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
