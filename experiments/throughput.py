"""Training throughput and MFU of full-rank and every low-rank method on this device.

  python -m experiments.throughput --config=configs/pretrain.py:llama_60m,lost \
      --precisions=float32,mixed --batch=8 --torch --out_md=docs/benchmarks/throughput.md \
      --out_json=docs/benchmarks/throughput.json --out_png=docs/benchmarks/throughput.png

In one process: (1) the device's own matmul peak, measured with a large jitted matmul in each
run's compute dtype (float32; bf16 inputs with float32 accumulation for `mixed`, which is how
the projections compute); (2) the real train step (`lost_jax.training.steps.make_train_step`: forward,
backward, clipping, AdamW) of full-rank and each low-rank method at the same model dims, on a
fixed synthetic batch of `--batch` sequences of `--seq_len` tokens. Variants are interleaved
round by round and medians reported, so a change in background load hits every variant alike.

MFU = tokens/s x accounting.train_flops_per_token / peak of the same compute dtype. The
FLOP-predicted speedup of a method is full-rank's train FLOPs/token over the method's; the
realised speedup is its tokens/s over full-rank's; "realised / predicted" is their ratio.
`--size` may replace `--config`; the method named in `--config` is ignored (`--methods` lists
what runs) and `--config.*` overrides apply to every method. `--torch` adds
`experiments/torch_baseline.py` (full_rank and lost in PyTorch: compiled step, fused AdamW),
timed in the same rounds right after the JAX steps (`lost_jax.measure.timing.interleave`);
`--from_json` re-renders a saved result without measuring.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from experiments import common
from lost_jax import configs
from lost_jax.training import accounting
from lost_jax.measure import flops as flops_lib
from lost_jax.measure import timing
from lost_jax.recipes import pretrain
from lost_jax.training import runtime, steps
from lost_jax.training import state as train_state
from lost_jax.training import xla_setup

METHODS = ("full_rank", "lost", "low_rank", "cola", "sltrain")
REFERENCE = "full_rank"
TORCH_METHODS = ("full_rank", "lost")   # what experiments/torch_baseline.py implements
# Targets of the issue (llama_60m dims, seq 256, float32, this CPU).
MFU_TARGET = 0.80           # full-rank float32 MFU vs the measured peak (issue #14)
SPEEDUP_TARGET = 0.90       # LOST's realised / FLOP-predicted speedup over full-rank
LOAD_LIMIT = 2.5            # 1-minute load average below which the machine counts as quiet


# ----------------------------------------------------------------------------- arithmetic
def speedup(reference: dict, row: dict) -> dict[str, float]:
  """FLOP-predicted and realised speedup of `row` over `reference`, and their ratio.

  Each dict needs 'train_flops_per_token' and 'tokens_per_s'.
  """
  predicted = reference["train_flops_per_token"] / row["train_flops_per_token"]
  realised = row["tokens_per_s"] / reference["tokens_per_s"]
  return dict(predicted=predicted, realised=realised, fraction=realised / predicted)


def logits_share(model: ml_collections.ConfigDict, seq_len: int) -> float:
  """Share of forward (= train) FLOPs/token spent in the vocab projection (2 d V)."""
  return 2 * model.d_model * model.vocab_size / accounting.forward_flops_per_token(model,
                                                                                   seq_len)


# ----------------------------------------------------------------------------- measuring
def bench_config(size: str, method: str, precision: str, batch: int, seq_len: int,
                 overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`<size>,<method>` preset (baseline ranks matched to LOST's) for one throughput row."""
  over = dict(overrides or {})
  over.update({"train.batch_size": batch, "train.microbatches": 1,
               "data.seq_len": seq_len, "train.precision": precision})
  cfg = common.method_config(size, method, over)
  cfg.name = f"{size},{method}"
  check = ml_collections.ConfigDict(cfg.to_dict())
  configs.apply_precision(check)
  configs.validate_pretrain(check)
  return cfg


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """One packed-layout batch of random tokens (one document per row, every token weighted)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                        (batch, seq_len)).copy(),
              segment_ids=np.ones((batch, seq_len), np.int32),
              weights=np.ones((batch, seq_len), np.float32))


class StepRunner:
  """A compiled train step with its own state and a fixed batch; `run(n)` times n steps."""

  def __init__(self, cfg: ml_collections.ConfigDict, seed: int = 0):
    cfg, mesh = runtime.start(cfg, "pretrain")
    self.cfg = cfg
    setup = pretrain.make_setup(cfg, mesh)
    self.step = steps.make_train_step(setup, 1)
    self.state, self.rest = setup.init(jax.random.key(seed))
    self.batch = train_state.to_global(synthetic_batch(cfg.train.batch_size, cfg.data.seq_len,
                                                 cfg.model.vocab_size, seed), mesh)
    self.loss = float("nan")
    t0 = time.perf_counter()
    self.run(1)   # compiles
    self.compile_s = time.perf_counter() - t0

  def run(self, n: int) -> list[float]:
    """Wall seconds of each of n steps (each waits for its own result)."""
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      self.state, out = self.step(self.state, self.rest, self.batch)
      self.loss = float(jax.block_until_ready(out)["loss"])
      times.append(time.perf_counter() - t0)
    return times


def run(size: str, methods: Iterable[str] = METHODS,
        precisions: Iterable[str] = ("float32", "mixed"), *, batch: int = 8,
        seq_len: int = 256, rounds: int = 5, steps_per_round: int = 2, warmup: int = 1,
        peak_sizes: Iterable[int] = (1024, 2048), overrides: dict[str, Any] | None = None,
        extra_runners: dict[tuple[str, str], Callable[[int], list[float]]] | None = None,
        extra_flops: dict[tuple[str, str], float] | None = None,
        log: Callable[[str], None] = print) -> dict:
  """Measure every (precision, method) train step, interleaved; rows with MFU and speedups.

  `extra_runners` (e.g. the PyTorch baseline) are keyed (precision, name) and timed in the
  same rounds; their FLOPs/token come from `extra_flops` (default: full-rank's).
  """
  methods, precisions = list(methods), list(precisions)
  if REFERENCE not in methods:
    raise ValueError(f"methods={methods} lack {REFERENCE!r}, the speedup reference. "
                     f"Fix: add it to --methods.")
  load_before = timing.load_average()
  peaks = {p: flops_lib.peak_flops(p, peak_sizes) for p in precisions}
  log("peak FLOP/s: " + ", ".join(f"{p} {v / 1e9:.1f} G" for p, v in peaks.items()))
  cfgs, runners, compile_s = {}, {}, {}
  for p in precisions:
    for method in methods:
      cfg = bench_config(size, method, p, batch, seq_len, overrides)
      runner = StepRunner(cfg)
      cfgs[(p, method)], runners[(p, method)] = runner.cfg, runner.run
      compile_s[(p, method)] = runner.compile_s
      log(f"built {p} {method}: compile + first step {runner.compile_s:.1f} s")
  extra_runners = extra_runners or {}
  times = timing.interleave({f"{p}/{m}": fn for (p, m), fn in runners.items()}, rounds,
                            steps_per_round, warmup, log,
                            others={f"{p}/{m}": fn for (p, m), fn in extra_runners.items()})
  runners.update(extra_runners)
  rows = []
  for (p, m) in runners:
    ref_cfg = cfgs[(p, REFERENCE)]
    if (p, m) in cfgs:
      cfg = cfgs[(p, m)]
      flops = accounting.train_flops_per_token(cfg.model, seq_len)
      kind, rank = cfg.model.linear.kind, cfg.model.linear.rank
    else:
      flops = (extra_flops or {}).get((p, m),
                                      accounting.train_flops_per_token(ref_cfg.model, seq_len))
      kind, rank = "torch.compile", 0
    row = dict(precision=p, method=m, kind=kind, rank=rank if kind != "dense" else 0,
               train_flops_per_token=flops, step_times_s=times[f"{p}/{m}"],
               compile_s=compile_s.get((p, m), float("nan")),
               **flops_lib.step_stats(times[f"{p}/{m}"], batch * seq_len, flops, peaks[p]))
    rows.append(row)
  for p in precisions:
    ref = next(r for r in rows if r["precision"] == p and r["method"] == REFERENCE)
    for r in rows:
      if r["precision"] == p:
        r["speedup"] = speedup(ref, r)
  model = cfgs[(precisions[0], REFERENCE)].model
  return dict(size=size, batch=batch, seq_len=seq_len, rounds=rounds,
              steps_per_round=steps_per_round, peaks=peaks, rows=rows,
              logits_share={m: logits_share(cfgs[(precisions[0], m)].model, seq_len)
                            for m in methods},
              model=dict(d_model=model.d_model, ffn_dim=model.ffn_dim,
                         n_layers=model.n_layers, n_heads=model.n_heads,
                         vocab_size=model.vocab_size),
              load_before=load_before, load_after=timing.load_average())


# ----------------------------------------------------------------------------- report
def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (or the platform string elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.partition(":")[2].strip()
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or platform.machine()


def targets(result: dict) -> list[tuple[str, float, float, bool]]:
  """(description, value, target, met) for the issue's targets, where measured: full-rank
  MFU in float32; LOST's realised share of its FLOP-predicted speedup in every precision."""
  out = []
  for r in result["rows"]:
    if r["method"] == REFERENCE and r["precision"] == "float32":
      out.append(("full-rank float32 MFU vs measured float32 peak", r["mfu"], MFU_TARGET,
                  r["mfu"] >= MFU_TARGET))
    if r["method"] == "lost":
      frac = r["speedup"]["fraction"]
      out.append((f"LOST {r['precision']} realised / FLOP-predicted speedup", frac,
                  SPEEDUP_TARGET, frac >= SPEEDUP_TARGET))
  return out


def versus_torch(result: dict) -> list[tuple[str, str, float, float, float]]:
  """(precision, method, lost_jax step s, torch step s, torch / lost_jax) where both ran."""
  steps = {(r["precision"], r["method"]): r["step_s"] for r in result["rows"]}
  out = []
  for (p, m), torch_s in steps.items():
    ours = steps.get((p, m.removeprefix("torch_"))) if m.startswith("torch_") else None
    if ours is not None:
      out.append((p, m.removeprefix("torch_"), ours, torch_s, torch_s / ours))
  return out


def report(result: dict, command: str, notes: str = "", image: str = "") -> str:
  """Markdown: setup, peaks, the table, logits share, targets."""
  m = result["model"]
  tokens = result["batch"] * result["seq_len"]
  quiet = max(result["load_before"], result["load_after"]) < LOAD_LIMIT
  parts = [
      "# Training throughput and MFU (CPU)\n",
      common.page_head(command, result.get("code_version")),
      f"Device: {cpu_model()}, {os.cpu_count()} cores; {common.environment()}.\n",
      f"Model: {result['size']} dims (d_model {m['d_model']}, ffn {m['ffn_dim']}, "
      f"{m['n_layers']} layers, {m['n_heads']} heads, vocab {m['vocab_size']}, untied head). "
      f"Per step: {result['batch']} sequences x {result['seq_len']} tokens = {tokens} tokens "
      f"(one micro-batch), synthetic tokens, the real train step (forward, backward, "
      f"clipping, AdamW). Baseline ranks match LOST's projection parameters. Each variant: "
      f"one warm-up step, then {result['rounds']} interleaved rounds of "
      f"{result['steps_per_round']} steps; medians reported.\n",
      f"Load average (1 min) before / after: {result['load_before']:.2f} / "
      f"{result['load_after']:.2f} on {os.cpu_count()} cores"
      + ("." if quiet else f" -- measured UNDER LOAD (above {LOAD_LIMIT}): other jobs shared "
         "the cores, so absolute numbers are low and noisy; ratios are interleaved.") + "\n",
      "## Measured matmul peak\n",
      "Jitted square matmul, best of sizes " + "; ".join(
          f"{p}: {v / 1e9:.1f} GFLOP/s" for p, v in result["peaks"].items())
      + ". `mixed` means bfloat16 inputs with float32 accumulation "
      "(`preferred_element_type=float32`), as the projections compute.\n",
      "## Throughput\n",
  ]
  header = ["precision", "method", "linear (rank)", "train GFLOP/token", "step ms",
            "tokens/s", "GFLOP/s", "MFU", "predicted speedup", "realised speedup",
            "realised / predicted"]
  rows = []
  for r in result["rows"]:
    s = r["speedup"]
    rows.append([r["precision"], r["method"],
                 r["kind"] + (f" ({r['rank']})" if r["rank"] else ""),
                 f"{r['train_flops_per_token'] / 1e9:.3f}", f"{1e3 * r['step_s']:.0f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_s'] / 1e9:.1f}",
                 f"{r['mfu']:.1%}", f"{s['predicted']:.2f}x", f"{s['realised']:.2f}x",
                 f"{s['fraction']:.0%}"])
  parts.append(common.markdown_table(header, rows) + "\n")
  if image:
    parts.append(f"![tokens/s per method and precision]({image})\n")
  parts.append("Vocab projection (LM head, 2 x d_model x vocab per token) share of train "
               "FLOPs: " + ", ".join(f"{k} {v:.0%}" for k, v in result["logits_share"].items())
               + ". It is dense in every method, so it bounds every low-rank speedup.\n")
  vs = versus_torch(result)
  if vs:
    parts.append("## lost_jax vs PyTorch (`experiments/torch_baseline.py`, torch.compile)\n")
    parts.append(common.markdown_table(
        ["precision", "method", "lost_jax step ms", "torch step ms", "lost_jax speed / torch"],
        [[p, m, f"{1e3 * j:.0f}", f"{1e3 * t:.0f}", f"{ratio:.2f}x"]
         for p, m, j, t, ratio in vs]) + "\n")
  parts.append("## Targets\n")
  for desc, value, target, met in targets(result):
    parts.append(f"- {desc}: {value:.0%} (target >= {target:.0%}): "
                 f"{'met' if met else 'NOT met'}.")
  for p, m, _, _, ratio in vs:
    parts.append(f"- lost_jax {m} {p} at least as fast as PyTorch: {ratio:.2f}x: "
                 f"{'met' if ratio >= 1.0 else 'NOT met'}.")
  if notes:
    parts.append("\n## Notes\n\n" + notes.strip() + "\n")
  return "\n".join(parts) + "\n"


def plot(result: dict, path: str) -> None:
  """Grouped bars: tokens/s of every method (x) per precision (one bar each), labelled MFU."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  precisions = list(dict.fromkeys(r["precision"] for r in result["rows"]))
  methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
  by = {(r["precision"], r["method"]): r for r in result["rows"]}
  fig = Figure(figsize=(8.0, 4.2))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  width = 0.8 / len(precisions)
  for j, p in enumerate(precisions):
    xs = [i + (j - (len(precisions) - 1) / 2) * width for i, m in enumerate(methods)
          if (p, m) in by]
    rows = [by[(p, m)] for m in methods if (p, m) in by]
    bars = ax.bar(xs, [r["tokens_per_s"] for r in rows], width, label=p)
    ax.bar_label(bars, [f"{r['mfu']:.0%}" for r in rows], fontsize=7)
  ax.set_xticks(range(len(methods)), [m.replace("torch_", "torch\n") for m in methods],
                fontsize=8)
  ax.set_ylabel("tokens / s (bar label: MFU)")
  ax.set_title(f"{result['size']} dims, {result['batch']} x {result['seq_len']} tokens per step")
  ax.grid(axis="y", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_outputs(result: dict, out_md: str = "", out_json: str = "", out_png: str = ""
                  ) -> str:
  """The report (returned) and the files asked for: markdown, raw JSON, plot.

  `result` carries its own "command" and "notes", so a saved JSON re-renders (--from_json).
  """
  for path in (out_md, out_json, out_png):
    if path:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  image = ""
  if out_png:
    plot(result, out_png)
    image = os.path.relpath(out_png, os.path.dirname(out_md) or ".") if out_md else out_png
  text = report(result, result["command"], notes=result.get("notes", ""), image=image)
  if out_md:
    with open(out_md, "w") as fh:
      fh.write(text)
  if out_json:
    import json  # pylint: disable=g-import-not-at-top
    with open(out_json, "w") as fh:
      json.dump(result, fh, indent=2, default=float)
  return text


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  if f.from_json:   # re-render a saved measurement (report, plot) without timing anything
    import json  # pylint: disable=g-import-not-at-top
    with open(f.from_json) as fh:
      result = json.load(fh)
    print(write_outputs(result, f.out_md, "", f.out_png))
    return
  size = f.size or common.config_arg(f["config"]).partition(",")[0].strip() or "llama_60m"
  if size not in configs.SIZES:
    raise app.UsageError(f"unknown size {size!r}; choose from {configs.SIZES}")
  bad = [m for m in f.methods if m not in METHODS]
  if bad:
    raise app.UsageError(f"methods {bad} cannot be timed here; choose from {METHODS}")
  quiet, load = timing.wait_for_quiet(f.max_load, 60 * f.wait_minutes)
  print(f"load average {load:.2f}: " + ("quiet" if quiet else "still busy, measuring anyway"))
  extra, extra_flops = {}, {}
  if f.torch:
    from experiments import torch_baseline  # pylint: disable=g-import-not-at-top
    for p in f.precisions:
      for method in [m for m in TORCH_METHODS if m in f.methods]:
        cfg = bench_config(size, method, p, f.batch, f.seq_len,
                           config_flags.get_override_values(f["config"]))
        extra[(p, f"torch_{method}")] = torch_baseline.make_runner(cfg)
        extra_flops[(p, f"torch_{method}")] = accounting.train_flops_per_token(cfg.model,
                                                                                f.seq_len)
  result = run(size, f.methods, f.precisions, batch=f.batch, seq_len=f.seq_len,
               rounds=f.rounds, steps_per_round=f.steps_per_round,
               overrides=config_flags.get_override_values(f["config"]),
               extra_runners=extra, extra_flops=extra_flops)
  result.update(command=common.command_line(), code_version=common.code_version_line(),
                notes=_read(f.notes))
  print(write_outputs(result, f.out_md, f.out_json, f.out_png))


def _read(path: str) -> str:
  if not path:
    return ""
  with open(path) as f:
    return f.read()


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/pretrain.py:llama_60m,lost",
                                  "configs/pretrain.py:<size>[,method]; the size sets the "
                                  "dims, --config.* overrides apply to every method.",
                                  lock_config=True)
  flags.DEFINE_string("size", "", "Size preset; replaces the size named in --config.")
  flags.DEFINE_list("methods", list(METHODS), "Methods to time (full_rank is the reference).")
  flags.DEFINE_list("precisions", ["float32", "mixed"], "train.precision values to time.")
  flags.DEFINE_integer("batch", 8, "Sequences per step (one micro-batch).")
  flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
  flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
  flags.DEFINE_integer("steps_per_round", 2, "Timed steps of each variant per round.")
  flags.DEFINE_float("max_load", LOAD_LIMIT, "Wait for the 1-min load average to drop below.")
  flags.DEFINE_float("wait_minutes", 0.0, "Longest wait for a quiet machine.")
  flags.DEFINE_bool("torch", False, "Also time experiments/torch_baseline.py (its full_rank "
                    "and lost, where --methods has them).")
  flags.DEFINE_string("out_md", "", "Write the markdown report here.")
  flags.DEFINE_string("out_json", "", "Write the raw result here.")
  flags.DEFINE_string("out_png", "", "Write a tokens/s bar chart here (linked from --out_md).")
  flags.DEFINE_string("from_json", "", "Re-render --out_md / --out_png from a saved --out_json "
                      "result instead of measuring.")
  flags.DEFINE_string("notes", "", "A markdown file appended to the report as Notes.")
  return flags.FLAGS


if __name__ == "__main__":
  xla_setup.configure()   # before the first JAX computation
  from absl import app  # pylint: disable=g-import-not-at-top
  _flags = define_flags()
  common.code_version_line()   # the code this run starts on
  app.run(lambda argv: _main(argv, _flags), flags_parser=common.parse_flags)
