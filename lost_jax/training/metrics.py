"""Where a run's numbers go: stdout progress, metrics.jsonl, TensorBoard events and a PNG plot."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from typing import Callable

import jax
import tqdm


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events (tensorboardX)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      self._tb = _summary_writer_cls()(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    append_jsonl(self.path, {"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    for key, value in scalars.items():
      if math.isfinite(float(value)):   # a skipped step's NaN loss stays in metrics.jsonl only
        self._tb.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _summary_writer_cls():
  """tensorboardX.SummaryWriter, imported without torch.

  tensorboardX try-imports torch (seconds of start-up) only to accept torch tensors; we log
  floats, so torch is hidden from that one import when it is not loaded already.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None        # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def append_jsonl(path: str, row: dict) -> None:
  """Append `row` as one JSON line, starting a new line after one a kill tore."""
  with open(path, "a+b") as f:
    torn = f.tell() > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
    f.write((("\n" if torn else "") + json.dumps(row) + "\n").encode())


def read_jsonl(path: str) -> list[dict]:
  """The JSON lines of `path` ([] when it is missing), skipping one torn by a kill."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:   # a line torn by a kill mid-append (the resume goes on below)
      continue
  return records


def read_metrics(workdir: str) -> list[dict]:
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


EVALUATIONS = "evaluations.jsonl"


def append_evaluation(workdir: str, row: dict) -> dict:
  """Append one evaluation (labelled with what was evaluated) to <workdir>/evaluations.jsonl
  on process 0, stamped with the UTC time; the training metrics are left alone."""
  row = {**row, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if jax.process_index() == 0:
    append_jsonl(os.path.join(workdir, EVALUATIONS), row)
  return row


def read_evaluations(workdir: str) -> list[dict]:
  return read_jsonl(os.path.join(workdir, EVALUATIONS))


class StepClock:
  """Seconds per step in steady state, for the ETA.

  The median time per step over the last `window` steps, leaving out the first `warmup`
  steps after `start` (compilation, first allocations): one-off pauses (a new step shape
  compiled, an evaluation, a checkpoint) do not inflate it, and it follows a lasting change
  of pace (SparseLoRA's sparse phase) within window / 2 steps. Until a step after the
  warm-up is marked, the last interval between two marked steps stands in.
  """

  def __init__(self, start: int, warmup: int = 2, window: int = 20,
               clock: Callable[[], float] = time.time):
    self.start, self.warmup, self.window, self.clock = start, warmup, window, clock
    self.intervals: list[float] = []               # seconds per step after the warm-up
    self.last: tuple[int, float] | None = None     # (step, time) of the newest mark
    self.first_interval: float | None = None       # before any interval after the warm-up

  def mark(self, step: int, now: float | None = None) -> None:
    """Step `step` has finished (at `now`, default the clock)."""
    now = self.clock() if now is None else now
    if self.last is not None and step > self.last[0]:
      per_step = (now - self.last[1]) / (step - self.last[0])
      if self.last[0] >= self.start + self.warmup:
        self.intervals = (self.intervals + [per_step])[-self.window:]
      else:
        self.first_interval = per_step
    self.last = (step, now)

  def seconds_per_step(self) -> float | None:
    if self.intervals:
      return statistics.median(self.intervals)
    return self.first_interval

  def eta(self, step: int, total: int) -> str:
    """H:MM:SS left for steps step..total at the steady-state rate ('?' before one is known)."""
    rate = self.seconds_per_step()
    if rate is None:
      return "?"
    return format_seconds(rate * max(total - step, 0))


def format_seconds(secs: float) -> str:
  """H:MM:SS (hours may exceed 24)."""
  secs = int(round(secs))
  return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"


class Progress:
  """A tqdm bar (step, ETA) plus one printed line per logged step."""

  def __init__(self, total: int, start: int, enabled: bool = True):
    self.bar = tqdm.tqdm(total=total, initial=start, disable=not enabled, unit="step",
                         dynamic_ncols=True, mininterval=1.0)
    self.clock = StepClock(start)

  def update(self, step: int) -> None:
    self.clock.mark(step)
    self.bar.update(step - self.bar.n)

  def log(self, line: str) -> None:
    self.bar.write(line)

  def eta(self, step: int, total: int) -> str:
    return self.clock.eta(step, total)

  def close(self) -> None:
    self.bar.close()


def plot_curves(rows_by_name: dict[str, list[dict]], key: str, path: str, *,
                ylabel: str, title: str, logy: bool = False) -> None:
  """One line per run of `key` vs step, saved as a PNG."""
  # An unwritable HOME only costs matplotlib its font cache (it uses a temporary one): not
  # worth the two warning lines it would print at import.
  logging.getLogger("matplotlib").setLevel(logging.ERROR)
  # A figure on its own Agg canvas: no pyplot state, no global backend switch (notebooks).
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4, 4.2))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for name, rows in rows_by_name.items():
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


_LABELS = {"eval_loss": "loss", "eval_ppl": "perplexity", "eval_tokens": "tokens",
           "eval_accuracy": "exact-match accuracy"}


def format_metric(key: str, value) -> str:
  label = _LABELS.get(key, key)
  if key.endswith("tokens"):
    return f"{label} {int(value)}"
  return f"{label} {value:.4f}" if isinstance(value, float) else f"{label} {value}"


class StepLogger:
  """Turns one step's device metrics into a log line, metrics.jsonl row and TB scalars."""

  def __init__(self, train_cfg, writer, log, progress, flops_per_token, n_dev):
    self.cfg, self.writer, self.log, self.progress = train_cfg, writer, log, progress
    self.flops_per_token, self.n_dev = flops_per_token, n_dev
    self.window_t, self.window_tokens, self.window_steps = time.time(), 0.0, 0
    self.streak, self.skipped = 0, 0    # consecutive and total non-finite (skipped) steps

  def __call__(self, step: int, dev_metrics) -> None:
    m = jax.device_get(dev_metrics)
    self.window_tokens += float(m["tokens"])
    self.window_steps += 1
    self.progress.update(step)
    if m.get("skipped", False):
      self.streak += 1
      self.skipped += 1
      self.log(f"step {step}: loss {float(m['loss']):.4g}, grad norm "
               f"{float(m['grad_norm']):.4g}: not finite, update skipped ({self.streak} in a "
               f"row, {self.skipped} in all)")
    else:
      self.streak = 0
    if step % self.cfg.log_every and step != self.cfg.steps:
      return
    now = time.time()
    elapsed = max(now - self.window_t, 1e-9)
    tok_s = self.window_tokens / elapsed
    scalars = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens_per_s": tok_s, "step_time": elapsed / self.window_steps}
    if self.skipped:
      scalars["skipped_steps"] = self.skipped
    if self.cfg.peak_flops > 0:
      scalars["mfu"] = tok_s * self.flops_per_token / (self.cfg.peak_flops * self.n_dev)
    self.writer.write(step, scalars)
    mfu = f" | mfu {scalars['mfu']:.1%}" if "mfu" in scalars else ""
    mfu += f" | skipped {self.skipped}" if self.skipped else ""
    self.log(f"step {step}/{self.cfg.steps} | loss {float(m['loss']):.4f} | "
             f"lr {float(m['lr']):.2e} | gnorm {float(m['grad_norm']):.3f} | "
             f"{tok_s:,.0f} tok/s | {scalars['step_time'] * 1e3:.0f} ms/step{mfu} | "
             f"ETA {self.progress.eta(step, self.cfg.steps)}")
    self.window_t, self.window_tokens, self.window_steps = now, 0.0, 0


def plot_run(workdir: str, name: str) -> None:
  """The run's curves as `eval_ppl.png` and `train_loss.png` in its workdir, each once it has
  two steps logged: a single point is no curve (metrics.jsonl and the TensorBoard events hold
  it), and a run that draws nothing never imports matplotlib."""
  rows = read_metrics(workdir)
  for key, file, ylabel, logy in (("eval_ppl", "eval_ppl.png", "validation perplexity", True),
                                  ("loss", "train_loss.png", "train loss", False)):
    if len({r["step"] for r in rows if key in r}) >= 2:
      plot_curves({name: rows}, key, os.path.join(workdir, file), ylabel=ylabel, title=name,
                  logy=logy)
