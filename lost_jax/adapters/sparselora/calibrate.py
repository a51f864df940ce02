"""Plan calibration: per-layer probes (one part of one layer sparse) and the plan choice.

A probe runs the normal SparseLoRA forward with a plan that makes `part` ('ffn' or 'attn')
sparse at one sparsity in every layer, each layer wrapped in `ProbeChannels`: only the layer
equal to a traced `target` takes its sparse branch (`lax.cond`), the others run dense. So one
compiled forward per part and kept-channel count serves every layer.

`choose_plan` is the pure selection: per (part, layer) group one option (dense or a measured
sparsity), the fewest FLOPs with the summed loss increase within the budget (a
multiple-choice knapsack, solved exactly on a fixed grid of loss increase). `fit_plan`
searches the additive budget for the largest plan whose measured loss fits the real budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from lost_jax.models.llama import dense_projection
from lost_jax.adapters.sparselora.model import LayerChannels
from lost_jax.adapters.sparselora.plan import SparsityPlan

PARTS = ("ffn", "attn")   # what a plan gives a sparsity per layer
# The grid of summed relative loss increase: every sparse option costs at least one step, so
# a zero budget is the dense plan and noise-level "improvements" never add up for free.
COST_UNIT = 1e-5


class ProbeChannels:
  """Layer `inner.layer`'s plan in a probe: `inner` (sparse) if `on` (traced bool), else dense."""

  def __init__(self, inner: LayerChannels, on: jax.Array):
    self.inner, self.on = inner, on

  def dense_from(self) -> int:
    return self.inner.dense_from()

  def attention_projection(self, attn, h_BxLxD: jax.Array):
    sparse = self.inner.attention_projection(attn, h_BxLxD)
    if sparse is dense_projection:
      return sparse

    def projection(name, lin, x, bias=None):
      return jax.lax.cond(self.on, lambda x: sparse(name, lin, x, bias),
                          lambda x: dense_projection(name, lin, x, bias), x)
    return projection

  def mlp(self, mlp, h_BxLxD: jax.Array) -> jax.Array:
    if not self.inner._sparse("ffn"):   # pylint: disable=protected-access
      return mlp(h_BxLxD)
    return jax.lax.cond(self.on, lambda h: self.inner.mlp(mlp, h), mlp, h_BxLxD)


def probe_wrap(target: jax.Array):
  """`forward`'s wrap for a probe of layer `target` (int32 scalar, traced)."""
  return lambda ch: ProbeChannels(ch, target == ch.layer)


def plan_of(choice: dict[tuple[str, int], float], like: SparsityPlan) -> SparsityPlan:
  """The plan of {(part, layer): sparsity} (absent: dense), `like`'s other settings."""
  n = like.n_layers
  return dataclasses.replace(like, ffn=tuple(choice.get(("ffn", i), 0.0) for i in range(n)),
                             attn=tuple(choice.get(("attn", i), 0.0) for i in range(n)))


def part_plan(part: str, sparsity: float, like: SparsityPlan,
              layers: Sequence[int] | None = None) -> SparsityPlan:
  """`part` at `sparsity` on `layers` (default: all), the other part dense; like `like`."""
  layers = range(like.n_layers) if layers is None else layers
  return plan_of({(part, i): sparsity for i in layers}, like)


class Option(NamedTuple):
  """One candidate of a (part, layer) group: its sparsity, measured relative loss increase
  (probe loss / dense loss - 1) and the FLOPs per step it saves against dense."""
  sparsity: float
  increase: float
  saving: float


def choose_plan(groups: dict[tuple[str, int], list[Option]], budget: float,
                unit: float = COST_UNIT) -> dict[tuple[str, int], float]:
  """{(part, layer): sparsity} saving the most FLOPs with sum of increases <= budget.

  Exact on the grid: an option costs ceil(max(increase, 0) / unit) steps, at least 1; options
  that save no FLOPs are never taken. The budget's grid is fixed (`unit`), so a larger budget
  never yields a plan with fewer saved FLOPs.
  """
  if budget < 0:
    raise ValueError(f"budget={budget} must be >= 0.")
  cap = int(math.floor(budget / unit + 1e-9))
  keys = sorted(groups)
  best_C = np.zeros(cap + 1)                       # most FLOPs saved within c steps
  picks = np.full((len(keys), cap + 1), -1, np.int32)
  for g, key in enumerate(keys):
    new_C = best_C.copy()                          # option -1: the group stays dense
    for o, opt in enumerate(groups[key]):
      cost = max(1, math.ceil(max(opt.increase, 0.0) / unit - 1e-9))
      if opt.saving <= 0 or cost > cap:
        continue
      cand = np.full(cap + 1, -np.inf)
      cand[cost:] = best_C[:cap + 1 - cost] + opt.saving
      better = cand > new_C
      new_C[better] = cand[better]
      picks[g, better] = o
    best_C = new_C
  choice, c = {}, cap
  for g in range(len(keys) - 1, -1, -1):           # walk the table back
    o = picks[g, c]
    if o >= 0:
      opt = groups[keys[g]][o]
      choice[keys[g]] = opt.sparsity
      c -= max(1, math.ceil(max(opt.increase, 0.0) / unit - 1e-9))
  return choice


def fit_plan(groups: dict[tuple[str, int], list[Option]], budget: float,
             measure: Callable[[dict[tuple[str, int], float]], float],
             unit: float = COST_UNIT, resolution: float = 0.1
             ) -> tuple[dict[tuple[str, int], float], float, list[tuple[float, int, float]]]:
  """The plan `choose_plan` picks at the largest grid budget c * unit <= `budget` whose
  measured increase (`measure(choice)`, the whole plan's loss over dense - 1) fits `budget`.

  Single-layer increases do not add up (a plan of many parts, each harmless alone, can cost
  far more than their sum), so the additive budget is searched by bisection on c, geometric
  (the fitting c can be orders of magnitude below the budget's), until the bounds are within
  `resolution` of each other; choose_plan saves no fewer FLOPs at a larger c, and the search
  assumes the measured increase grows with it. A plan is measured once. Returns (choice, its
  measured increase, [(additive budget, parts, measured increase) per measurement]); the
  dense plan ({}, 0.0) when no measured plan fits.
  """
  cap = int(math.floor(budget / unit + 1e-9))
  seen: dict[tuple, float] = {}
  tried: list[tuple[float, int, float]] = []

  def at(c: int) -> tuple[dict, float]:
    choice = choose_plan(groups, c * unit, unit) if c > 0 else {}
    key = tuple(sorted(choice.items()))
    if key not in seen:
      seen[key] = measure(choice) if choice else 0.0
      if choice:
        tried.append((c * unit, len(choice), seen[key]))
    return choice, seen[key]

  lo, hi = 0, cap
  best = at(hi)
  if best[1] <= budget:
    return best[0], best[1], tried
  best = at(0)
  while hi - lo > 1 and hi > lo * (1 + resolution):
    mid = min(hi - 1, max(lo + 1, round(math.sqrt(max(lo, 1) * hi))))
    choice, inc = at(mid)
    if inc <= budget:
      lo, best = mid, (choice, inc)
    else:
      hi = mid
  return best[0], best[1], tried
