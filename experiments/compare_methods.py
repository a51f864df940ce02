"""A fair comparison of LOST with its baselines: learning-rate sweeps, seeds, two budgets.

  nice -n 19 python -m experiments.compare_methods [--name=compare_d256] [--max_runs=N]
  python -m experiments.compare_methods --report_only      # documents from finished runs

Protocol (the same for every method; written at the top of the generated document):
- Same model shape (d_model 256, ffn 688, 4 layers, 4 heads, vocab 4096), data (stdlib
  corpus, packed rows of 256 tokens, same shuffle), batch (16 x 256 tokens), schedule shape
  (10% linear warmup, cosine to 0.1 x peak), AdamW b1 0.9 / b2 0.95, clip 1, no weight
  decay, float32, and evaluation (the same >= 200k held-out tokens, whose documents the
  tokenizer never saw, at the same steps).
- One peak learning rate (SHARED_LR) for the embedding, LM head and norm scales of every
  method (`train.shared_lr`); only the block (q/k/v/o/gate/up/down) learning rate differs.
- Per method, the block lr is swept on a factor-2 ladder (lr_i = 1e-2 x 2^i) at the sweep
  budget (~1M tokens, seed 0): >= 4 values for full_rank, LOST and CoLA, >= 3 for the
  others. When the best value is at an edge of the grid the sweep extends past that edge
  (up to MAX_EXTENSIONS times), so the chosen rate is bracketed.
- The chosen rate is re-run with seeds 0, 1, 2 at the sweep budget and at twice it (~2M
  tokens); the document reports mean, standard deviation and min-max at both budgets and
  validation curves with min-max bands.
- Baselines: full_rank, LOST, low_rank, CoLA, SLTrain (ranks matching LOST's projection
  parameters), GaLore (dense model, rank-projected AdamW at LOST's rank, scale 0.25 as in its
  recipe); controls: LOST with gamma 1 (SVD-initialised factors, same SiLU, no sparse branch)
  and LOST with random channels (same random keys as LOST, see layers.LOSTLinear).

Order: the full_rank and LOST sweeps and their seeded runs come first, then the controls
(bracketing LOST's chosen rate), CoLA, GaLore, low_rank and SLTrain, then the extra seeds at
the sweep budget, then a check of the shared rate (0.5x and 2x for full_rank and LOST,
extended past an edge like the sweep). Every finished run is stored as
`<results_dir>/<key>.json` keyed by its full config and the code version
(experiments/runs.py): re-running resumes a half-finished sweep, reuses only results of the
same code and regenerates the documents after every run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Callable, Iterable

import ml_collections

from experiments import common, runs
from lost_jax.training import trainer as train

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
  train.apply_precision(check)
  train.validate(check)
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


def _ppl(result: dict | None) -> float:
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
    best = min(grid, key=lambda i: _ppl(results[i]))   # ties: the lower point
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


def sweep(proto: Protocol, *, name: str, results_dir: str, workdir_root: str, out_dir: str,
          command: str, max_runs: int = 0, quiet: bool = True,
          log: Callable[[str], None] = print) -> int:
  """Run the plan until it is empty (or `max_runs` runs), rewriting the documents after each
  run; return the number of runs trained."""
  get = make_lookup(proto, results_dir)
  done = 0
  while not max_runs or done < max_runs:
    todo = plan(proto, get)
    if not todo:
      break
    # The stage's runs in their (interleaved) order; plan again once they are done, since
    # finished sweeps may extend a grid or open the next stage.
    for n, spec in enumerate(todo):
      if max_runs and done >= max_runs:
        break
      if get(spec) is not None:
        continue
      cfg = spec_config(proto, spec)
      log(f"[{name}] run {done + 1}: {spec} ({len(todo) - n} left in this stage)")
      result = runs.run(cfg, workdir_root, results_dir=results_dir, quiet=quiet)
      common.drop_checkpoints(workdir_root, result["key"])
      log(f"[{name}] {spec}: validation perplexity {result['eval_ppl']:.3f} "
          f"({result['wall_s'] / 60:.1f} min) -> {result['key']}.json")
      done += 1
      write_report(proto, get, name=name, out_dir=out_dir, command=command)
  write_report(proto, get, name=name, out_dir=out_dir, command=command)
  return done


# ------------------------------------------------------------------------------- reporting
def _fmt_ms(s: dict) -> str:
  return f"{s['mean']:.2f} ± {s['std']:.2f}" if s["n"] > 1 else f"{s['mean']:.2f}"


def budget_rows(proto: Protocol, get: Lookup, steps: int) -> dict[str, dict]:
  """entry -> {lr_index, results (finished seeds)} at the chosen rate and `steps`."""
  out = {}
  for e in ENTRIES:
    best = sweep_state(proto, e, get)[2]
    if best is None:
      continue
    res = [r for r in (get(Spec(e, best, s, steps)) for s in proto.seeds) if r is not None]
    out[e] = dict(lr_index=best, results=res)
  return out


def budget_table(proto: Protocol, rows: dict[str, dict]) -> tuple[str, list[str]]:
  """Markdown table of one budget and the ranking sentence (complete entries only)."""
  n_want = len(proto.seeds)
  ref = None
  if "full_rank" in rows and rows["full_rank"]["results"]:
    ref = common.mean_spread([_ppl(r) for r in rows["full_rank"]["results"]])["mean"]
  table, complete = [], []
  for e in ENTRIES:
    if e not in rows:
      table.append([e, "pending (sweep)", "", "", "", "", "", ""])
      continue
    row = rows[e]
    res = row["results"]
    lr = f"{lr_of(row['lr_index']):.3g}"
    if not res:
      table.append([e, lr, f"0 of {n_want}", "pending", "", "", "", ""])
      continue
    s = common.mean_spread([_ppl(r) for r in res])
    p = res[0]["params"]
    gap = f"{100 * (s['mean'] / ref - 1):+.1f}%" if ref and e != "full_rank" else ""
    tps = common.mean_spread([r["tokens_per_s"] for r in res])["mean"]
    n = f"{s['n']} of {n_want}" + ("" if s["n"] == n_want else " (pending)")
    table.append([e, lr, n, f"**{_fmt_ms(s)}**", f"{s['min']:.2f} – {s['max']:.2f}", gap,
                  f"{p['trainable'] / 1e6:.3f} / {p['projections'] / 1e6:.3f}",
                  f"{tps:,.0f}"])
    if s["n"] == n_want:
      complete.append((e, s))
  header = ["method", "block lr", "seeds", "val ppl mean ± std", "min – max",
            "vs full_rank (mean)", "trainable / projection params (M)",
            "train tokens/s (mean of medians)"]
  order = sorted(complete, key=lambda es: es[1]["mean"])
  if order:
    rank = ("Ranking of the methods with all seeds finished (mean final validation "
            "perplexity, lower is better): " + ", ".join(
                f"{i}. {e} ({_fmt_ms(s)})" for i, (e, s) in enumerate(order, 1)) + ".")
  else:
    rank = "No method has all its seeds at this budget yet."
  return common.markdown_table(header, table), [rank]


def separated(a: dict, b: dict) -> bool:
  """True when the min-max ranges of two seed sets do not overlap."""
  return a["max"] < b["min"] or b["max"] < a["min"]


def control_text(rows: dict[str, dict]) -> str:
  """LOST against its two controls at one budget."""
  if "lost" not in rows or not rows["lost"]["results"]:
    return "LOST's seeded runs are pending."
  lost = common.mean_spread([_ppl(r) for r in rows["lost"]["results"]])
  parts = []
  for c in ("lost_gamma1", "lost_random_channels"):
    res = rows.get(c, {}).get("results")
    if not res:
      parts.append(f"{c}: pending")
      continue
    s = common.mean_spread([_ppl(r) for r in res])
    verdict = ("ranges do not overlap" if separated(lost, s) else "ranges overlap")
    parts.append(f"{c} {_fmt_ms(s)} (n={s['n']}) vs LOST {_fmt_ms(lost)} (n={lost['n']}), "
                 f"{100 * (s['mean'] / lost['mean'] - 1):+.1f}%, {verdict}")
  return "Controls: " + "; ".join(parts) + "."


def complete_stats(proto: Protocol, rows: dict[str, dict]) -> dict[str, dict]:
  """entry -> mean_spread of its final validation perplexities, for entries with every seed."""
  return {e: common.mean_spread([_ppl(r) for r in row["results"]])
          for e, row in rows.items() if len(row["results"]) == len(proto.seeds)}


def settled_text(proto: Protocol, rows_by_steps: dict[int, dict[str, dict]]) -> str:
  """Whether the ranking at the sweep budget holds at the final budget: the pairs of
  entries (all seeds at both budgets) whose order of mean perplexity flips, and the final
  order with '<' where neighbours' seed ranges are apart and '~' where they overlap."""
  (short, a), (long_, b) = sorted((n, complete_stats(proto, r))
                                  for n, r in rows_by_steps.items())
  both = sorted(set(a) & set(b), key=lambda e: b[e]["mean"])
  if len(both) < 2:
    return "Pending: fewer than two methods have all their seeds at both budgets."
  label = {short: f"{proto.tokens(short):,}", long_: f"{proto.tokens(long_):,}"}
  flips = []
  for i, x in enumerate(both):
    for y in both[i + 1:]:              # x before y at the final budget
      if a[x]["mean"] > a[y]["mean"]:
        flips.append(f"{y} ahead of {x} at {label[short]} tokens "
                     f"({_fmt_ms(a[y])} vs {_fmt_ms(a[x])}, ranges "
                     f"{'apart' if separated(a[x], a[y]) else 'overlap'}), behind at "
                     f"{label[long_]} ({_fmt_ms(b[y])} vs {_fmt_ms(b[x])}, ranges "
                     f"{'apart' if separated(b[x], b[y]) else 'overlap'})")
  chain = both[0]
  for x, y in zip(both, both[1:]):
    chain += (" < " if separated(b[x], b[y]) else " ~ ") + y
  pending = sorted((set(a) ^ set(b)) | (set(ENTRIES) - set(a) - set(b)))
  return (f"Among the {len(both)} entries with every seed at both budgets, "
          + (f"the order of mean perplexity at {label[short]} tokens is the same as at "
             f"{label[long_]} tokens" if not flips else
             f"{len(flips)} pair(s) change order from {label[short]} to {label[long_]} "
             "tokens: " + "; ".join(flips))
          + f". Final order at {label[long_]} tokens, '<' where neighbours' seed min-max "
          f"ranges are apart, '~' where they overlap: {chain}."
          + (f" Not yet complete at both budgets: {', '.join(pending)}." if pending else ""))


def _grid_cells(cols: list[int], state: tuple[list[int], list[int], int | None],
                result_of: Callable[[int], dict]) -> list[str]:
  """One table row of a _bracket search: blank off its grid, 'pending' for points to run,
  the final validation perplexity otherwise, bold at the best point."""
  grid, todo, best = state
  cells = []
  for i in cols:
    if i not in grid:
      cells.append("")
    elif i in todo:
      cells.append("pending")
    else:
      v = _ppl(result_of(i))
      cells.append(f"**{v:.2f}**" if i == best else f"{v:.2f}")
  return cells


def sweep_table(proto: Protocol, get: Lookup) -> str:
  """Entry x block lr -> final validation perplexity at the sweep budget (seed 0)."""
  states = {e: sweep_state(proto, e, get) for e in ENTRIES}
  cols = sorted({i for g, _, _ in states.values() for i in g})
  table = []
  for e, (grid, todo, best) in states.items():
    cells = _grid_cells(cols, states[e],
                        lambda i: get(Spec(e, i, proto.seeds[0], proto.sweep_steps)))
    if best is None:
      chosen = "pending" if grid else "pending (after LOST's sweep)"
    else:
      edge = best in (grid[0], grid[-1])
      chosen = f"{lr_of(best):.3g}" + (" (at an edge: extensions exhausted)" if edge else "")
    table.append([e] + cells + [chosen])
  return common.markdown_table(["method"] + [f"{lr_of(i):.3g}" for i in cols]
                               + ["chosen block lr"], table)


def shared_table(proto: Protocol, get: Lookup) -> str:
  """full_rank and LOST at their chosen block lr with the shared lr scaled by 2^k (the
  shifts of shared_state), and the gap between them at each one's best shared lr."""
  base = dict(proto.overrides)["train.shared_lr"]
  states = {e: shared_state(proto, e, get) for e in FIRST}
  shifts = sorted(set().union(*(g for g, _, _ in states.values())) | set(SHARED_SHIFTS) | {0})
  table, best_ppl, at0 = [], {}, {}
  for e in FIRST:
    block = sweep_state(proto, e, get)[2]
    if block is None:
      table.append([e] + ["pending"] * len(shifts))
      continue
    result_of = lambda k, e=e, block=block: get(Spec(e, block, proto.seeds[0],
                                                     proto.sweep_steps, k))
    table.append([e] + _grid_cells(shifts, states[e], result_of))
    grid, _, top = states[e]
    if top is not None:     # a best at an edge: _bracket ran out of extensions
      best_ppl[e] = (top, _ppl(result_of(top)), top in (grid[0], grid[-1]))
      at0[e] = _ppl(result_of(0))
  text = (f"Final validation perplexity at the sweep budget (seed {proto.seeds[0]}) at each "
          "method's chosen block lr, with the embedding / head / norm learning rate scaled; "
          f"the protocol uses {base:g} for every method. While a method's best is on an edge "
          f"of its shifts, the next one past it is added (up to {MAX_EXTENSIONS}), as in the "
          "block-lr sweep. A protocol value far from both methods' best would have favoured "
          "one of them.\n\n")
  out = text + common.markdown_table(
      ["method"] + [f"shared lr {base * 2.0 ** k:g}" for k in shifts], table)
  if len(best_ppl) == len(FIRST):
    (fk, fp, fe), (lk, lp, le) = best_ppl["full_rank"], best_ppl["lost"]
    edge = lambda x: " (at the edge of the searched range: not bracketed)" if x else ""
    out += (f"\n\nEach method's best shared lr: full_rank {base * 2.0 ** fk:g} ({fp:.2f})"
            f"{edge(fe)}, LOST {base * 2.0 ** lk:g} ({lp:.2f}){edge(le)}. LOST vs full_rank "
            f"(seed {proto.seeds[0]}): {100 * (lp / fp - 1):+.1f}% with each at its best "
            f"shared lr, {100 * (at0['lost'] / at0['full_rank'] - 1):+.1f}% at the protocol's "
            f"{base:g}. The block lr was not re-tuned at the other shared rates.")
  return out


def _curves(results: list[dict]) -> list[list[tuple[int, float]]]:
  return [[(s, p) for s, _, p in r["eval_curve"]] for r in results]


def shared_setup(cfg: ml_collections.ConfigDict) -> str:
  """The settings every run of the comparison shares, in one sentence."""
  m, d, t = cfg.model, cfg.data, cfg.train
  return (f"LLaMA, d_model {m.d_model}, ffn {m.ffn_dim}, {m.n_layers} layers, {m.n_heads} "
          f"heads, vocab {m.vocab_size}, untied head; `{d.source}` corpus, seq_len "
          f"{d.seq_len}, packing={d.packing}; batch {t.batch_size} sequences; warmup "
          f"{t.warmup_frac:.0%}, cosine to {t.min_lr_ratio:g} x peak; AdamW b1 {t.b1:g}, "
          f"b2 {t.b2:g}, eps {t.eps:g}; clip {t.clip_norm:g}; weight decay {t.weight_decay:g}; "
          f"precision {t.precision}.")


def finished_and_pending(proto: Protocol, get: Lookup) -> tuple[int, list[Spec]]:
  """Number of finished runs the plan knows of, and the runs of the current stage left."""
  seen = set()
  for e in ENTRIES:
    grid, _, best = sweep_state(proto, e, get)
    seen |= {Spec(e, i, proto.seeds[0], proto.sweep_steps) for i in grid}
    if best is not None:
      seen |= {Spec(e, best, s, n) for s in proto.seeds
               for n in (proto.sweep_steps, proto.final_steps)}
      if e in FIRST:
        seen |= {Spec(e, best, proto.seeds[0], proto.sweep_steps, k)
                 for k in shared_state(proto, e, get)[0]}
  return sum(get(s) is not None for s in seen), plan(proto, get)


def write_report(proto: Protocol, get: Lookup, *, name: str, out_dir: str, command: str,
                 version: dict | None = None) -> str:
  """Write `<out_dir>/<name>.md`, the plots and `<name>.json`; return the markdown.
  `version`: the code version `get` reads results of (default: this code's)."""
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  budgets = [(proto.sweep_steps, "sweep budget"), (proto.final_steps, "final budget")]
  rows = {steps: budget_rows(proto, get, steps) for steps, _ in budgets}
  # Validation-perplexity-vs-lr plot of the sweep.
  sweep_pts = {}
  for e in ENTRIES:
    grid, todo, _ = sweep_state(proto, e, get)
    pts = [(lr_of(i), _ppl(get(Spec(e, i, proto.seeds[0], proto.sweep_steps))))
           for i in grid if i not in todo]
    sweep_pts[e] = [pts] if pts else []
  common.plot_bands(sweep_pts, base + "_sweep.png", f"{name}: learning-rate sweep "
                    f"({proto.tokens(proto.sweep_steps):,} tokens, seed {proto.seeds[0]})",
                    xlabel="block learning rate", log_x=True)
  for steps, _ in budgets:
    common.plot_bands({e: _curves(r["results"]) for e, r in rows[steps].items()},
                      f"{base}_{steps}steps.png", f"{name}: chosen rates, "
                      f"{proto.tokens(steps):,} tokens (mean, min-max band over seeds)")
  first = spec_config(proto, Spec("lost", 0, proto.seeds[0], proto.final_steps))
  version = version or runs.code_version()
  n_done, todo = finished_and_pending(proto, get)
  status = (f"**Status: {n_done} run(s) finished; "
            + (f"{len(todo)} run(s) left in the current stage (including "
               + ", ".join(map(str, todo[:3]))
               + (", ..." if len(todo) > 3 else "") + "), later stages follow; "
               "every \"pending\" below is a run not yet finished.**"
               if todo else "the comparison is complete.**"))
  parts = [
      f"# {name}: LOST vs baselines, learning rates tuned per method, "
      f"{len(proto.seeds)} seeds, two budgets\n",
      status + "\n",
      "Generated by experiments/compare_methods.py from the stored results in "
      f"`{os.path.basename(base)}_runs/` (one JSON per finished run). Command (from the "
      f"repository root; it resumes the sweep and rewrites this document after each run):"
      f"\n\n```\n{command}\n```\n",
      "Code version of these results (experiments/runs.code_version; a result is reused "
      f"only under the same version): `{json.dumps(version, sort_keys=True)}`.\n",
      "## Protocol\n",
      f"- Same for every method: {shared_setup(first)}",
      f"- Validation: the first {train.eval_batch_count(first)} batches of {first.train.batch_size}"
      f" x {first.data.seq_len} positions of the held-out split "
      f"(data.eval_fraction {first.data.eval_fraction:g} of the stdlib documents, chosen by a "
      "hash of their id), identical batches for every method; the tokenizer was trained "
      "only on documents outside that split (tokenizer.training_document_ids). Perplexity "
      "is exp of the token-weighted mean loss.",
      f"- One peak learning rate for the embedding, LM head and norm scales of every method: "
      f"train.shared_lr = {dict(proto.overrides)['train.shared_lr']:g} (not tuned per "
      "method; the last stage checks 0.5x and 2x for full_rank and LOST, extended past an "
      "edge: see the shared learning-rate check). Only the block (q/k/v/o/gate/up/down) "
      "learning rate "
      "differs between methods.",
      f"- Sweep: block lr on the ladder 1e-2 x 2^i, seed {proto.seeds[0]}, "
      f"{proto.sweep_steps} steps ({proto.tokens(proto.sweep_steps):,} tokens); >= 4 values "
      "for full_rank, LOST and CoLA, >= 3 for the others (the controls: LOST's chosen rate "
      f"and its two neighbours); a best value at a grid edge adds the next value past it "
      f"(up to {MAX_EXTENSIONS} times).",
      f"- Chosen rate re-run with seeds {', '.join(map(str, proto.seeds))} (model init and "
      f"data order) at {proto.sweep_steps} steps ({proto.tokens(proto.sweep_steps):,} "
      f"tokens) and {proto.final_steps} steps ({proto.tokens(proto.final_steps):,} tokens); "
      "schedule length follows the budget. Spread: sample standard deviation and min-max "
      "over seeds.",
      "- Parameters: low_rank, CoLA and SLTrain use the rank matching LOST's projection "
      "parameters (configs.matched_rank); GaLore projects at LOST's rank with scale 0.25 "
      f"(its recipe) every {first.train.galore_update_freq} steps; its block lr is the "
      "AdamW lr before that scale. Its recipe's lr 0.01 for the unprojected parameters is "
      "replaced by the shared rate, as for every method.",
      "- Controls: lost_gamma1 (gamma 1: SVD-initialised factors with SiLU, the sparse "
      "branch multiplied by 0, so its values never change) asks whether LOST's gain is "
      "initialisation alone; lost_random_channels draws the kept channels at random from the "
      "same key stream, so every other parameter starts identical to LOST's.\n",
      f"Measured on {common.environment()}. tokens/s is the mean over seeds of each run's "
      "median logged window; on this shared CPU it also reflects other load.\n",
      "## Learning-rate sweep\n",
      f"Final validation perplexity after {proto.tokens(proto.sweep_steps):,} tokens "
      f"(seed {proto.seeds[0]}); bold: the chosen rate.\n",
      sweep_table(proto, get) + "\n",
      f"![validation perplexity vs block learning rate]({name}_sweep.png)\n",
  ]
  summary = {}
  for steps, label in budgets:
    table, rank = budget_table(proto, rows[steps])
    parts += [f"## {proto.tokens(steps):,} tokens ({steps} steps, {label})\n", table + "\n",
              " ".join(rank) + "\n", control_text(rows[steps]) + "\n",
              f"![validation perplexity vs step]({name}_{steps}steps.png)\n"]
    summary[str(steps)] = {e: dict(lr=lr_of(r["lr_index"]), seeds=[x["seed"] for x in
                                                                   r["results"]],
                                   eval_ppl=[x["eval_ppl"] for x in r["results"]])
                           for e, r in rows[steps].items()}
  parts += ["## Has the ranking settled?\n",
            settled_text(proto, {steps: rows[steps] for steps, _ in budgets}) + "\n",
            "## Shared learning-rate check\n", shared_table(proto, get) + "\n"]
  parts.append("Methods: " + "; ".join(f"{e}: {x.what}" for e, x in ENTRIES.items()) + ".\n")
  md = "\n".join(parts)
  with open(base + ".md", "w") as f:
    f.write(md)
  with open(base + ".json", "w") as f:
    json.dump({"code_version": version, "budgets": summary}, f, indent=1, sort_keys=True)
  return md


def tuned_lr(proto: Protocol, results_dir: str, entry: str = "lost") -> float | None:
  """The chosen block lr of `entry` from finished sweep runs, or None while pending."""
  best = sweep_state(proto, entry, make_lookup(proto, results_dir))[2]
  return None if best is None else lr_of(best)


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  results_dir = f.results_dir or os.path.join(f.out_dir, f.name + "_runs")
  workdir_root = os.path.join(f.workdir_root, f.name)
  command = common.command_line()
  version = runs.code_version()
  if f.sources_hash:
    if not f.report_only:
      print("error: --sources_hash only reports; a run is never resumed or reused under "
            "other code. Fix: add --report_only, or drop --sources_hash.", file=sys.stderr)
      sys.exit(2)
    version = dict(version, sources=f.sources_hash)
  get = make_lookup(D256, results_dir, version)
  if f.dry_run:
    for spec in plan(D256, get):
      print(spec.entry, lr_of(spec.lr_index), spec.seed, spec.steps)
    return
  if f.report_only:
    write_report(D256, get, name=f.name, out_dir=f.out_dir, version=version,
                 command="python -m experiments.compare_methods" + (
                     f" --name={f.name}" if f.name != "compare_d256" else ""))
    return
  n = sweep(D256, name=f.name, results_dir=results_dir, workdir_root=workdir_root,
            out_dir=f.out_dir, command=command, max_runs=f.max_runs, quiet=f.quiet)
  print(f"[{f.name}] trained {n} run(s); documents in {f.out_dir}/{f.name}.md")


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("name", "compare_d256", "Name of the comparison: document file names.")
  flags.DEFINE_string("out_dir", "docs/results", "Where <name>.md/.json/*.png are written.")
  flags.DEFINE_string("results_dir", "", "Where finished runs are stored as <key>.json "
                      "(default <out_dir>/<name>_runs).")
  flags.DEFINE_string("workdir_root", "/tmp/lost_jax_runs", "Checkpoints of runs in progress "
                      "go to <workdir_root>/<name>/<key>.")
  flags.DEFINE_integer("max_runs", 0, "Stop after this many trained runs (0: all).")
  flags.DEFINE_bool("report_only", False, "Only regenerate the documents.")
  flags.DEFINE_bool("dry_run", False, "Print the runs of the current stage and exit.")
  flags.DEFINE_bool("quiet", True, "No per-step progress lines.")
  flags.DEFINE_string("sources_hash", "", "With --report_only: report the results made by "
                      "the code whose sources hash this is (runs.code_version) instead of "
                      "this checkout's, e.g. those of a sweep started before a merge.")
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, _main)
