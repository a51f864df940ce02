"""The method comparison's protocol: compared entries, the lr ladder, the bracketing sweeps
and the plan of runs still to do (the command line is experiments/compare_methods.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import ml_collections

from experiments import common, runs
from lost_jax import configs

LR_BASE = 1e-2          # ladder: lr_i = LR_BASE * 2**i (contains GaLore's published 0.01)
MAX_EXTENSIONS = 3      # grid points added past an edge before the sweep gives up
SHARED_SHIFTS = (-1, 1)  # the shared-lr check: 0.5 x and 2 x the protocol's shared lr


@dataclasses.dataclass(frozen=True)
class Entry:
  """One compared method: its preset, the fields set on it, its initial ladder indices
  (None: LOST's chosen index and its two neighbours) and a one-line description."""
  method: str
  fields: tuple[tuple[str, object], ...]
  grid: tuple[int, ...] | None
  what: str


ENTRIES: dict[str, Entry] = {
    "full_rank": Entry("full_rank", (), (-5, -4, -3, -2), "dense AdamW"),
    "lost": Entry("lost", (), (-3, -2, -1, 0), "LOST: SVD factors + channel-sparse "
                  "complement, gamma 0.7, SiLU"),
    "lost_gamma1": Entry("lost", (("model.linear.gamma", 1.0),), None,
                         "control: LOST with gamma 1 (SVD-initialised low-rank factors, SiLU, "
                         "no sparse branch)"),
    "lost_random_channels": Entry("lost", (("model.linear.sparse_init", "random_channels"),),
                                  None, "control: LOST with random channels (S = rows of "
                                  "the initial weight), same random keys as LOST"),
    "cola": Entry("cola", (), (-3, -2, -1, 0), "CoLA: silu(x A) B^T, random factors"),
    "galore": Entry("galore", (), (-1, 0, 1), "dense, GaLore AdamW (rank = LOST's, "
                    "scale 0.25)"),
    "low_rank": Entry("low_rank", (), (-3, -2, -1), "x A B^T, random factors"),
    "sltrain": Entry("sltrain", (), (-3, -2, -1), "SLTrain: low-rank + random element-wise "
                     "sparse"),
}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Everything that is the same for every method, and the budgets."""
  size: str
  overrides: tuple[tuple[str, object], ...]
  sweep_steps: int
  final_steps: int
  seeds: tuple[int, ...]
  eval_every: tuple[tuple[int, int], ...]   # (steps, eval_every) per budget
  label: str                                # model label in run names, e.g. "d256"

  def tokens(self, steps: int) -> int:
    o = dict(self.overrides)
    return steps * o["train.batch_size"] * o["data.seq_len"]


SHARED_LR = 2.5e-3   # embedding / head / norms of every method (ladder index -2)
D256 = Protocol(
    size="quickstart",
    overrides=(
        ("model.d_model", 256), ("model.ffn_dim", 688), ("model.n_layers", 4),
        ("model.n_heads", 4), ("model.n_kv_heads", 4), ("model.vocab_size", 4096),
        ("model.linear.rank", 64),
        ("data.seq_len", 256), ("data.packing", True), ("data.eval_fraction", 0.05),
        ("train.batch_size", 16), ("train.precision", "float32"), ("train.b1", 0.9),
        ("train.b2", 0.95), ("train.warmup_frac", 0.1), ("train.min_lr_ratio", 0.1),
        ("train.clip_norm", 1.0), ("train.weight_decay", 0.0),
        ("train.shared_lr", SHARED_LR),
        ("train.galore_scale", 0.25), ("train.galore_update_freq", 50),
        # 52 batches x 16 x 256 = 212,992 positions of the held-out split (~273k tokens).
        ("train.eval_tokens", 210_000), ("train.eval_batches", 64),
        ("train.log_every", 16), ("train.ckpt_every", 64),
    ),
    sweep_steps=256,      # 256 x 16 x 256 = 1,048,576 tokens
    final_steps=512,      # 2,097,152 tokens
    seeds=(0, 1, 2),
    eval_every=((256, 128), (512, 128)),   # each eval reads ~213k tokens
    label="d256",
)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run: entry, ladder index of the block lr, seed, steps; shared_shift k != 0 trains
  the embedding / head / norms at 2^k x the protocol's shared lr (the sensitivity check)."""
  entry: str
  lr_index: int
  seed: int
  steps: int
  shared_shift: int = 0

  def __str__(self) -> str:
    shared = f", shared lr x{2.0 ** self.shared_shift:g}" if self.shared_shift else ""
    return (f"{self.entry} lr {lr_of(self.lr_index):.3g} seed {self.seed} steps "
            f"{self.steps}{shared}")


def lr_of(index: int) -> float:
  return LR_BASE * 2.0 ** index


def protocol_config(proto: Protocol, method: str, fields: dict, *, lr: float, seed: int,
                    steps: int, name: str) -> ml_collections.ConfigDict:
  """The validated config of `method` under `proto` at block lr `lr`, `seed` and `steps`,
  then `fields` (flat) on top."""
  over = dict(proto.overrides)
  over.update({"train.lr": lr, "train.steps": steps, "seed": seed,
               "train.eval_every": dict(proto.eval_every)[steps]})
  cfg = common.method_config(proto.size, method, over)
  cfg.update_from_flattened_dict(fields)
  cfg.name = f"{proto.label},{name}"
  check = ml_collections.ConfigDict(cfg.to_dict())
  configs.apply_precision(check)
  configs.validate_pretrain(check)
  return cfg


def spec_config(proto: Protocol, spec: Spec) -> ml_collections.ConfigDict:
  """The validated run config of `spec` under `proto`."""
  e = ENTRIES[spec.entry]
  fields = dict(e.fields)
  if spec.shared_shift:
    fields["train.shared_lr"] = dict(proto.overrides)["train.shared_lr"] * 2.0 ** spec.shared_shift
  return protocol_config(proto, e.method, fields, lr=lr_of(spec.lr_index),
                         seed=spec.seed, steps=spec.steps, name=spec.entry)


# ------------------------------------------------------------------------------- planning
Lookup = Callable[[Spec], "dict | None"]


def final_ppl(result: dict | None) -> float:
  """Final validation perplexity, +inf for a diverged run (NaN or overflow)."""
  v = result["eval_ppl"]
  return v if math.isfinite(v) else math.inf


def _bracket(start: Iterable[int], result_of: Callable[[int], dict | None]
             ) -> tuple[list[int], list[int], int | None]:
  """(grid so far, points still to run, best point or None) of a 1-D search over integer
  points: the grid starts at `start` and grows by one past an edge while the lowest
  perplexity (result_of(i)) sits on that edge, at most MAX_EXTENSIONS times."""
  start = sorted(start)
  grid = list(start)
  while True:
    results = {i: result_of(i) for i in grid}
    todo = [i for i in grid if results[i] is None]
    if todo:
      return grid, todo, None
    best = min(grid, key=lambda i: final_ppl(results[i]))   # ties: the lower point
    if len(grid) - len(start) >= MAX_EXTENSIONS or best not in (grid[0], grid[-1]):
      return grid, [], best
    grid = sorted(grid + [best - 1 if best == grid[0] else best + 1])


def sweep_state(proto: Protocol, entry: str, get: Lookup) -> tuple[list[int], list[int],
                                                                  int | None]:
  """(grid so far, indices still to run, chosen index or None) of an entry's lr sweep.

  The grid starts from Entry.grid (or LOST's chosen index +-1) and grows by one past an edge
  while the best value sits on that edge, at most MAX_EXTENSIONS times.
  """
  start = ENTRIES[entry].grid
  if start is None:
    _, _, lost_best = sweep_state(proto, "lost", get)
    if lost_best is None:
      return [], [], None        # waits for LOST's sweep
    start = (lost_best - 1, lost_best, lost_best + 1)
  return _bracket(start, lambda i: get(Spec(entry, i, proto.seeds[0], proto.sweep_steps)))


def shared_state(proto: Protocol, entry: str, get: Lookup) -> tuple[list[int], list[int],
                                                                   int | None]:
  """(shifts so far, shifts still to run, best shift or None) of the shared-lr check: the
  entry at its chosen block lr, seed 0, sweep budget, with the shared lr x 2^k for k in
  SHARED_SHIFTS and 0, extended past an edge like the block-lr sweep."""
  best = sweep_state(proto, entry, get)[2]
  if best is None:
    return [], [], None
  return _bracket(set(SHARED_SHIFTS) | {0},
                  lambda k: get(Spec(entry, best, proto.seeds[0], proto.sweep_steps, k)))


def _interleave(lists: Iterable[list[Spec]]) -> list[Spec]:
  lists = [list(x) for x in lists]
  out = []
  while any(lists):
    for x in lists:
      if x:
        out.append(x.pop(0))
  return out


FIRST = ("full_rank", "lost")
REST = ("lost_gamma1", "lost_random_channels", "cola", "galore", "low_rank", "sltrain")


def plan(proto: Protocol, get: Lookup, entries: Iterable[str] = tuple(ENTRIES)) -> list[Spec]:
  """The runs of the first unfinished stage, in the order to run them.

  Stages: sweeps of full_rank and LOST; their seeded runs at the final budget; sweeps of the
  rest; their seeded runs at the final budget; the extra seeds at the sweep budget; the
  shared-lr check (full_rank and LOST at their chosen block lr, shared lr x 0.5 and x 2,
  extended past an edge until each method's best shared lr is bracketed).
  """
  entries = tuple(entries)
  first = [e for e in FIRST if e in entries]
  rest = [e for e in entries if e not in FIRST]

  def sweeps(names):
    return _interleave([Spec(e, i, proto.seeds[0], proto.sweep_steps)
                        for i in sweep_state(proto, e, get)[1]] for e in names)

  def seeded(names, steps, seeds):
    out = []
    for e in names:
      best = sweep_state(proto, e, get)[2]
      if best is not None:
        out += [s for s in (Spec(e, best, seed, steps) for seed in seeds) if get(s) is None]
    return out

  def shared_check(names):
    return [Spec(e, sweep_state(proto, e, get)[2], proto.seeds[0], proto.sweep_steps, k)
            for e in names for k in shared_state(proto, e, get)[1]]

  stages = [lambda: sweeps(first),
            lambda: seeded(first, proto.final_steps, proto.seeds),
            lambda: sweeps(rest),
            lambda: seeded(rest, proto.final_steps, proto.seeds),
            lambda: seeded(first + rest, proto.sweep_steps, proto.seeds[1:]),
            lambda: shared_check(first)]
  for stage in stages:
    todo = stage()
    if todo:
      return todo
  return []


# ------------------------------------------------------------------------------- running
def make_lookup(proto: Protocol, results_dir: str, version: dict | None = None) -> Lookup:
  """spec -> stored result made by code `version` (default: this code), or None."""
  version = version or runs.code_version()
  return lambda spec: runs.load_result(results_dir, spec_config(proto, spec), version)


def tuned_lr(proto: Protocol, results_dir: str, entry: str = "lost") -> float | None:
  """The chosen block lr of `entry` from finished sweep runs, or None while pending."""
  best = sweep_state(proto, entry, make_lookup(proto, results_dir))[2]
  return None if best is None else lr_of(best)
