"""The method comparison's protocols: compared entries, the lr ladder, the bracketing sweeps
and the plan of runs still to do (the command line is experiments/compare_methods.py).

Two protocols (PROTOCOLS). v1 (D256): eight methods at one shared embedding / head / norm
rate 0.0025, block rates swept on seed 0 at 1M tokens, then seeds 0, 1, 2 at 1M and 2M tokens
(seed 0 was both the selection run and a reported seed). v2 (D256_V2): full_rank, LOST,
lost_gamma1 and full_rank with LOST's kaiming init at the shared rate the v1 check found best
for both full_rank and LOST (0.005); block rates re-chosen on a selection seed that is never
reported with the others, at 1M and again at 2M tokens, then seeds 0, 1, 2 at 1M, 2M and 8M
tokens (8M at the rate chosen at 2M).
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
    "full_rank_kaiming": Entry("full_rank", (("model.linear.dense_init", "kaiming"),), None,
                               "control: dense AdamW with LOST's kaiming init (each dense "
                               "kernel is the weight LOST decomposes at the same seed)"),
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


V1_ENTRIES = ("full_rank", "lost", "lost_gamma1", "lost_random_channels", "cola", "galore",
              "low_rank", "sltrain")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Everything that is the same for every method, and the budgets.

  With `select_seed` None (v1) the block rate is swept on seeds[0] at sweep_steps and reused
  at every budget. Otherwise (v2) it is chosen on `select_seed` (never a reported seed) at
  each budget of `select_steps`, bracketing `centres` at the first and the previous choice
  after; a budget that is not a selection budget uses the choice of the last one before it.
  """
  size: str
  overrides: tuple[tuple[str, object], ...]
  sweep_steps: int
  final_steps: int
  seeds: tuple[int, ...]
  eval_every: tuple[tuple[int, int], ...]   # (steps, eval_every) per budget
  label: str                                # model label in run names, e.g. "d256"
  entries: tuple[str, ...] = V1_ENTRIES
  long_steps: tuple[int, ...] = ()          # budgets after final_steps
  select_seed: int | None = None
  select_steps: tuple[int, ...] = ()
  centres: tuple[tuple[str, int], ...] = ()  # entry -> ladder index the first choice brackets

  def tokens(self, steps: int) -> int:
    o = dict(self.overrides)
    return steps * o["train.batch_size"] * o["data.seq_len"]

  @property
  def budgets(self) -> tuple[int, ...]:
    """Every budget (steps) whose seeds are reported, shortest first."""
    return (self.sweep_steps, self.final_steps) + tuple(self.long_steps)


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

# v2: the shared rate where the v1 check found both full_rank and LOST best (seed 0, 1M
# tokens: full_rank 66.74 -> 56.79, LOST 49.31 -> 44.02 going from 0.0025 to 0.005).
SHARED_LR_V2 = 5e-3
D256_V2 = dataclasses.replace(
    D256,
    overrides=tuple((k, SHARED_LR_V2 if k == "train.shared_lr" else v)
                    for k, v in D256.overrides),
    eval_every=((256, 128), (512, 128), (2048, 256)),
    entries=("full_rank", "lost", "lost_gamma1", "full_rank_kaiming"),
    long_steps=(2048,),       # 8,388,608 tokens: 4 x the v1 final budget
    select_seed=3,            # a 4th seed: rates are never chosen on a reported seed
    select_steps=(256, 512),  # the 2M choice also serves 8M
    # v1's chosen block rates (1e-2 x 2^i; docs/results/compare_d256_v1.json, tested);
    # full_rank_kaiming starts from full_rank's.
    centres=(("full_rank", -5), ("lost", -2), ("lost_gamma1", -3), ("full_rank_kaiming", -5)),
)
PROTOCOLS = {"v1": D256, "v2": D256_V2}


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


def selection_state(proto: Protocol, entry: str, steps: int, get: Lookup
                    ) -> tuple[list[int], list[int], int | None]:
  """(grid so far, indices still to run, chosen index or None) of a v2 rate choice at the
  selection budget `steps`: the selection seed at the centre index and its neighbours (0.5x,
  2x), the centre being Protocol.centres at the first selection budget and the previous
  budget's choice after it; extended past an edge like the v1 sweep."""
  i = proto.select_steps.index(steps)
  centre = (dict(proto.centres)[entry] if i == 0 else
            selection_state(proto, entry, proto.select_steps[i - 1], get)[2])
  if centre is None:
    return [], [], None
  return _bracket((centre - 1, centre, centre + 1),
                  lambda j: get(Spec(entry, j, proto.select_seed, steps)))


def selection_budget(proto: Protocol, steps: int) -> int:
  """The budget whose choice of rate a run of `steps` uses (v2): the last selection budget
  at or below it."""
  return max(s for s in proto.select_steps if s <= steps)


def chosen_index(proto: Protocol, entry: str, steps: int, get: Lookup) -> int | None:
  """The ladder index `entry`'s seeds at `steps` run at, None while its choice is pending."""
  if proto.select_seed is None:
    return sweep_state(proto, entry, get)[2]
  return selection_state(proto, entry, selection_budget(proto, steps), get)[2]


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


def plan(proto: Protocol, get: Lookup) -> list[Spec]:
  """The runs of the first unfinished stage of `proto`, in the order to run them."""
  return plan_v1(proto, get) if proto.select_seed is None else plan_v2(proto, get)


def plan_v2(proto: Protocol, get: Lookup) -> list[Spec]:
  """The runs of the first unfinished stage of a v2 protocol.

  Per budget, shortest first: the rate choice on the selection seed (at a selection budget;
  entries interleaved), then the reported seeds at the chosen rates, seed by seed (every
  entry's seed 0, then every entry's seed 1, ...), so each finished stage is a usable result.
  """
  for steps in proto.budgets:
    if steps in proto.select_steps:
      todo = _interleave([Spec(e, i, proto.select_seed, steps)
                          for i in selection_state(proto, e, steps, get)[1]]
                         for e in proto.entries)
      if todo:
        return todo
    todo = [Spec(e, chosen_index(proto, e, steps, get), seed, steps)
            for seed in proto.seeds for e in proto.entries]
    todo = [s for s in todo if get(s) is None]
    if todo:
      return todo
  return []


def plan_v1(proto: Protocol, get: Lookup) -> list[Spec]:
  """The runs of the first unfinished stage of the v1 protocol, in the order to run them.

  Stages: sweeps of full_rank and LOST; their seeded runs at the final budget; sweeps of the
  rest; their seeded runs at the final budget; the extra seeds at the sweep budget; the
  shared-lr check (full_rank and LOST at their chosen block lr, shared lr x 0.5 and x 2,
  extended past an edge until each method's best shared lr is bracketed).
  """
  first = [e for e in FIRST if e in proto.entries]
  rest = [e for e in proto.entries if e not in FIRST]

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


def projected_stages(proto: Protocol, get: Lookup, max_stages: int = 64) -> list[list[Spec]]:
  """The stages still to run, in order: the current one exactly, the later ones as if every
  unfinished rate choice lands on its centre (no extension), so their rates are provisional."""
  centre = dict(proto.centres)
  simulated = {}
  look = lambda spec: get(spec) or simulated.get(spec)
  stages = []
  while len(stages) < max_stages:
    todo = plan(proto, look)
    if not todo:
      break
    stages.append(todo)
    simulated.update({s: {"eval_ppl": 1.0 + abs(s.lr_index - centre.get(s.entry, s.lr_index))}
                      for s in todo})
  return stages


# ------------------------------------------------------------------------------- running
def make_lookup(proto: Protocol, results_dir: str, version: dict | None = None) -> Lookup:
  """spec -> stored result made by code `version` (default: this code), or None; its
  `unrecorded` attribute: config fields that matched results of older code lack
  (runs.Store)."""
  store = runs.Store(results_dir, version or runs.code_version())
  get = lambda spec: store(spec_config(proto, spec))
  get.unrecorded = store.unrecorded
  return get


def tuned_lr(proto: Protocol, results_dir: str, entry: str = "lost",
             version: dict | None = None) -> float | None:
  """The chosen block lr of `entry` from finished sweep runs of code `version` (default:
  this code's), or None while pending."""
  best = sweep_state(proto, entry, make_lookup(proto, results_dir, version))[2]
  return None if best is None else lr_of(best)
