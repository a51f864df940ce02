"""Timing steps on a shared machine: interleaved rounds and waiting for a quiet host.

Step times of two variants are only comparable when background load hits both alike, so
variants run in interleaved rounds in one process (`interleave`), after the host's load
average has dropped (`wait_for_quiet`).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def interleave(runners: dict[str, Callable[[int], list[float]]], rounds: int,
               steps_per_round: int, warmup: int = 1,
               log: Callable[[str], None] = print,
               others: dict[str, Callable[[int], list[float]]] | None = None,
               switch_pause_s: float = 1.0) -> dict[str, list[float]]:
  """Run every runner `warmup` steps, then `rounds` x (each runner `steps_per_round` steps).

  `others` (another runtime, e.g. PyTorch) run in the same rounds after `runners`, each
  runtime's steps kept together and `switch_pause_s` of sleep at each switch: alternating
  torch's and XLA's thread pools step by step slowed the JAX steps by up to 25% on 2 cores
  (the other runtime's threads still spinning), while a shift in background load between
  two separately timed groups would bias the comparison.
  """
  groups = [runners] + ([others] if others else [])
  for group in groups:
    for run in group.values():
      run(warmup)
  times: dict[str, list[float]] = {name: [] for group in groups for name in group}
  for r in range(rounds):
    for group in groups:
      if len(groups) > 1:
        time.sleep(switch_pause_s)
      for name, run in group.items():
        times[name] += run(steps_per_round)
    log(f"round {r + 1}/{rounds}: " + ", ".join(
        f"{n} {1e3 * statistics.median(t):.0f} ms" for n, t in times.items()))
  return times


def load_average() -> float:
  """1-minute load average of this host."""
  return os.getloadavg()[0]


def wait_for_quiet(limit: float, max_wait_s: float, poll_s: float = 60.0,
                   log: Callable[[str], None] = print) -> tuple[bool, float]:
  """Poll the load average until it is below `limit` or `max_wait_s` passed: (quiet?, load)."""
  deadline = time.time() + max_wait_s
  while True:
    load = load_average()
    if load < limit:
      return True, load
    if time.time() >= deadline:
      return False, load
    log(f"load average {load:.2f} >= {limit}; waiting")
    time.sleep(min(poll_s, max(1.0, deadline - time.time())))
