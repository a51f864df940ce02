"""The method comparison's documents: tables, spreads, plots and the markdown page, written
from finished runs (the command line is experiments/compare_methods.py).
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Callable

import ml_collections

from experiments import common, runs
from lost_jax.recipes import pretrain
from experiments import compare_protocol as cp


# ------------------------------------------------------------------------------- reporting
def _fmt_ms(s: dict) -> str:
  return f"{s['mean']:.2f} ± {s['std']:.2f}" if s["n"] > 1 else f"{s['mean']:.2f}"


def budget_rows(proto: cp.Protocol, get: cp.Lookup, steps: int) -> dict[str, dict]:
  """entry -> {lr_index, results (finished seeds)} at the chosen rate and `steps`."""
  out = {}
  for e in proto.entries:
    best = cp.chosen_index(proto, e, steps, get)
    if best is None:
      continue
    res = [r for r in (get(cp.Spec(e, best, s, steps)) for s in proto.seeds) if r is not None]
    out[e] = dict(lr_index=best, results=res)
  return out


# Per budget: entry -> seed -> final validation perplexity (the statements' only input).
SeedPpl = dict[str, dict[int, float]]


def seed_ppl(rows: dict[str, dict]) -> SeedPpl:
  """entry -> {seed: final validation perplexity} of budget_rows."""
  return {e: {r["seed"]: cp.final_ppl(r) for r in row["results"]} for e, row in rows.items()}


def complete(proto: cp.Protocol, ppl: SeedPpl) -> SeedPpl:
  """The entries of `ppl` with every seed of the protocol."""
  return {e: p for e, p in ppl.items() if set(proto.seeds) <= set(p)}


def paired_change(a: dict[int, float], b: dict[int, float]) -> dict | None:
  """Per-seed change of a against b at the same seed, in % (100 (a_s / b_s - 1)) over the
  seeds both have: {n, mean, min, max, values}; None without a common seed."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return None
  d = [100.0 * (a[s] / b[s] - 1.0) for s in seeds]
  return dict(n=len(d), mean=statistics.fmean(d), min=min(d), max=max(d), values=d)


def fmt_change(c: dict) -> str:
  return f"{c['mean']:+.1f}% ({c['min']:+.1f}% .. {c['max']:+.1f}%)"


def ranking(ppl: SeedPpl) -> list[str]:
  """Entries by mean perplexity, lowest first (ties: name)."""
  return sorted(ppl, key=lambda e: (statistics.fmean(ppl[e].values()), e))


SETTLED, MEANS_ONLY, FLIPS, PENDING = "settled", "holds in the means only", "flips", "pending"


def order_verdict(x: str, y: str, by_budget: dict[int, SeedPpl], budgets: tuple[int, ...],
                  label: Callable[[int], str] = lambda b: f"{b} steps"
                  ) -> tuple[str, list[str]]:
  """Whether "x ahead of y" (lower mean perplexity) holds at every budget, and why.

  settled: x's mean is lower at every budget and x is lower in every seed pair;
  holds in the means only: lower mean at every budget, higher in some seed pair;
  flips: at some budget x's mean is not lower; pending: a budget lacks x or y (and no flip
  seen). The reasons name each budget where x is behind (the mean or seed pairs) or missing.
  """
  flips, behind_seeds, missing = [], [], []
  for b in budgets:
    p = by_budget.get(b, {})
    if x not in p or y not in p:
      missing.append(b)
      continue
    c = paired_change(p[x], p[y])
    if statistics.fmean(p[x].values()) >= statistics.fmean(p[y].values()):
      flips.append((b, c))
    elif any(v >= 0 for v in c["values"]):
      behind_seeds.append((b, sum(v >= 0 for v in c["values"]), c["n"]))
  why = [f"behind in the mean at {label(b)}, at the same seed {fmt_change(c)}"
         for b, c in flips]
  why += [f"behind in {k} of {n} seed pairs at {label(b)}" for b, k, n in behind_seeds]
  why += [f"not finished at {label(b)}" for b in missing]
  if flips:
    return FLIPS, why
  if missing:
    return PENDING, why
  return (MEANS_ONLY if behind_seeds else SETTLED), why


def tokens_per_param(proto: cp.Protocol, steps: int, rows: dict[str, dict]) -> dict[str, float]:
  """entry -> training tokens of the budget / its trainable parameters."""
  return {e: proto.tokens(steps) / row["results"][0]["params"]["trainable"]
          for e, row in rows.items() if row["results"]}


def statements(proto: cp.Protocol, rows_by_steps: dict[int, dict[str, dict]]
               ) -> tuple[str, dict]:
  """The computed statements (markdown) and their numbers (JSON): per budget the ranking
  of the entries with every seed, their per-seed changes against full_rank and the tokens
  per trainable parameter; LOST's margin over full_rank per budget; and for each
  neighbouring pair of the order at the largest budget ranked, whether it holds at every
  budget (order_verdict)."""
  budgets = proto.budgets
  ppl = {b: complete(proto, seed_ppl(rows_by_steps[b])) for b in budgets}
  tok = lambda b: f"{proto.tokens(b):,} tokens ({b} steps)"
  lines, data = [], {"budgets": {}, "lost_margin": {}, "pairs": []}
  for b in budgets:
    p, tpp = ppl[b], tokens_per_param(proto, b, rows_by_steps[b])
    rank = ranking(p)
    ref = p.get("full_rank")
    changes = {e: paired_change(p[e], ref) for e in rank if ref and e != "full_rank"}
    tpp_text = (f"{min(tpp.values()):.2f}–{max(tpp.values()):.2f} tokens per trainable "
                "parameter" if tpp else "no run finished")
    if not rank:
      lines.append(f"- **{tok(b)}**, {tpp_text}: no entry has every seed yet.")
    else:
      lines.append(
          f"- **{tok(b)}**, {tpp_text}: "
          + ", ".join(f"{i}. {e} ({statistics.fmean(p[e].values()):.2f})"
                      for i, e in enumerate(rank, 1))
          + (". Against full_rank at the same seed (mean, min .. max of the per-seed "
             "changes): " + ", ".join(f"{e} {fmt_change(c)}" for e, c in changes.items())
             if changes else "")
          + (f". Not yet every seed: {', '.join(sorted(set(proto.entries) - set(rank)))}"
             if set(proto.entries) - set(rank) else "") + ".")
    data["budgets"][str(b)] = dict(
        tokens=proto.tokens(b), ranking=rank,
        mean_ppl={e: statistics.fmean(p[e].values()) for e in rank},
        tokens_per_trainable_param=tpp,
        vs_full_rank={e: {k: c[k] for k in ("mean", "min", "max")}
                      for e, c in changes.items()})
  margins = []
  for b in budgets:
    c = (paired_change(ppl[b]["lost"], ppl[b]["full_rank"])
         if {"lost", "full_rank"} <= set(ppl[b]) else None)
    margins.append(f"{tok(b)}: " + (fmt_change(c) if c else "pending"))
    if c:
      data["lost_margin"][str(b)] = {k: c[k] for k in ("mean", "min", "max")}
  lines.append("\nLOST's margin over full_rank (LOST's perplexity against full_rank's at the "
               "same seed; mean, min .. max over seeds): " + "; ".join(margins) + ".")
  ranked = [b for b in budgets if len(ppl[b]) >= 2]
  if ranked:
    top = ranked[-1]
    order = ranking(ppl[top])
    lines.append(f"\nEach neighbouring pair of the order at {tok(top)}, checked at every budget "
                 f"({', '.join(str(b) for b in budgets)} steps): *{SETTLED}*: ahead in the mean "
                 f"and in every seed pair at every budget; *{MEANS_ONLY}*: ahead in the mean at "
                 f"every budget, not in every seed pair; *{FLIPS}*: not ahead in the mean at "
                 f"some budget; *{PENDING}*: a budget not finished.\n")
    n_settled = 0
    for x, y in zip(order, order[1:]):
      verdict, why = order_verdict(x, y, ppl, budgets, lambda b: f"{proto.tokens(b):,} tokens")
      n_settled += verdict == SETTLED
      lines.append(f"- {x} ahead of {y}: **{verdict}**" + (f": {'; '.join(why)}" if why
                                                           else "") + ".")
      data["pairs"].append(dict(ahead=x, behind=y, verdict=verdict, why=why))
    lines.append(f"\nSettled: {n_settled} of {len(order) - 1} neighbouring pair(s); the order "
                 "is settled only where every pair is.")
  return "\n".join(lines), data


def budget_table(proto: cp.Protocol, steps: int, rows: dict[str, dict]
                 ) -> tuple[str, list[str]]:
  """Markdown table of one budget and the ranking sentence (complete entries only)."""
  n_want = len(proto.seeds)
  ppl = seed_ppl(rows)
  ref = None
  if "full_rank" in rows and rows["full_rank"]["results"]:
    ref = common.mean_spread(list(ppl["full_rank"].values()))["mean"]
  tpp = tokens_per_param(proto, steps, rows)
  table, done = [], []
  for e in proto.entries:
    if e not in rows:
      table.append([e, "pending (rate choice)"] + [""] * 8)
      continue
    row = rows[e]
    res = row["results"]
    lr = f"{cp.lr_of(row['lr_index']):.3g}"
    if not res:
      table.append([e, lr, f"0 of {n_want}", "pending"] + [""] * 6)
      continue
    s = common.mean_spread(list(ppl[e].values()))
    p = res[0]["params"]
    gap = f"{100 * (s['mean'] / ref - 1):+.1f}%" if ref and e != "full_rank" else ""
    c = paired_change(ppl[e], ppl["full_rank"]) if ref and e != "full_rank" else None
    tps = common.mean_spread([r["tokens_per_s"] for r in res])["mean"]
    n = f"{s['n']} of {n_want}" + ("" if s["n"] == n_want else " (pending)")
    table.append([e, lr, n, f"**{_fmt_ms(s)}**", f"{s['min']:.2f} – {s['max']:.2f}", gap,
                  fmt_change(c) if c else "",
                  f"{p['trainable'] / 1e6:.3f} / {p['projections'] / 1e6:.3f}",
                  f"{tpp[e]:.2f}", f"{tps:,.0f}"])
    if s["n"] == n_want:
      done.append((e, s))
  header = ["method", "block lr", "seeds", "val ppl mean ± std", "min – max",
            "vs full_rank (ratio of means)", "vs full_rank at the same seed: mean (min .. max)",
            "trainable / projection params (M)", "tokens / trainable param",
            "train tokens/s (mean of medians)"]
  order = sorted(done, key=lambda es: es[1]["mean"])
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


CONTROLS = {"lost_gamma1": "lost", "lost_random_channels": "lost",
            "full_rank_kaiming": "full_rank"}   # control -> the entry it is compared with


def control_text(proto: cp.Protocol, rows: dict[str, dict]) -> str:
  """Each control of the protocol against its reference entry at one budget."""
  ppl = seed_ppl(rows)
  parts = []
  for c, ref in CONTROLS.items():
    if c not in proto.entries:
      continue
    if not ppl.get(c) or not ppl.get(ref):
      parts.append(f"{c} vs {ref}: pending")
      continue
    s, r = common.mean_spread(list(ppl[c].values())), common.mean_spread(list(ppl[ref].values()))
    verdict = "ranges do not overlap" if separated(r, s) else "ranges overlap"
    parts.append(f"{c} {_fmt_ms(s)} (n={s['n']}) vs {ref} {_fmt_ms(r)} (n={r['n']}), "
                 f"{100 * (s['mean'] / r['mean'] - 1):+.1f}% (ratio of means), at the same "
                 f"seed {fmt_change(paired_change(ppl[c], ppl[ref]))}, {verdict}")
  return ("Controls: " + "; ".join(parts) + ".") if parts else ""


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
      v = cp.final_ppl(result_of(i))
      cells.append(f"**{v:.2f}**" if i == best else f"{v:.2f}")
  return cells


def grid_table(states: dict[str, tuple[list[int], list[int], int | None]],
               result_of: Callable[[str, int], dict], waiting: str) -> str:
  """Entry x block lr -> final validation perplexity of each entry's _bracket search
  (`states`, result_of(entry, index)); `waiting`: the cell of a search not started."""
  cols = sorted({i for g, _, _ in states.values() for i in g})
  table = []
  for e, (grid, todo, best) in states.items():
    cells = _grid_cells(cols, states[e], lambda i, e=e: result_of(e, i))
    if best is None:
      chosen = "pending" if grid else waiting
    else:
      edge = best in (grid[0], grid[-1])
      chosen = f"{cp.lr_of(best):.3g}" + (" (at an edge: extensions exhausted)" if edge else "")
    table.append([e] + cells + [chosen])
  return common.markdown_table(["method"] + [f"{cp.lr_of(i):.3g}" for i in cols]
                               + ["chosen block lr"], table)


def sweep_table(proto: cp.Protocol, get: cp.Lookup) -> str:
  """v1: entry x block lr -> final validation perplexity at the sweep budget (seeds[0])."""
  return grid_table({e: cp.sweep_state(proto, e, get) for e in proto.entries},
                    lambda e, i: get(cp.Spec(e, i, proto.seeds[0], proto.sweep_steps)),
                    "pending (after LOST's sweep)")


def selection_table(proto: cp.Protocol, get: cp.Lookup, steps: int) -> str:
  """v2: entry x block lr -> final validation perplexity of the selection seed at `steps`."""
  return grid_table({e: cp.selection_state(proto, e, steps, get) for e in proto.entries},
                    lambda e, i: get(cp.Spec(e, i, proto.select_seed, steps)),
                    "pending (after the previous budget's choice)")


def shared_table(proto: cp.Protocol, get: cp.Lookup) -> str:
  """full_rank and LOST at their chosen block lr with the shared lr scaled by 2^k (the
  shifts of shared_state), and the gap between them at each one's best shared lr."""
  base = dict(proto.overrides)["train.shared_lr"]
  states = {e: cp.shared_state(proto, e, get) for e in cp.FIRST}
  shifts = sorted(set().union(*(g for g, _, _ in states.values())) | set(cp.SHARED_SHIFTS) | {0})
  table, best_ppl, at0 = [], {}, {}
  for e in cp.FIRST:
    block = cp.sweep_state(proto, e, get)[2]
    if block is None:
      table.append([e] + ["pending"] * len(shifts))
      continue
    result_of = lambda k, e=e, block=block: get(cp.Spec(e, block, proto.seeds[0],
                                                        proto.sweep_steps, k))
    table.append([e] + _grid_cells(shifts, states[e], result_of))
    grid, _, top = states[e]
    if top is not None:     # a best at an edge: _bracket ran out of extensions
      best_ppl[e] = (top, cp.final_ppl(result_of(top)), top in (grid[0], grid[-1]))
      at0[e] = cp.final_ppl(result_of(0))
  text = (f"Final validation perplexity at the sweep budget (seed {proto.seeds[0]}) at each "
          "method's chosen block lr, with the embedding / head / norm learning rate scaled; "
          f"the protocol uses {base:g} for every method. While a method's best is on an edge "
          f"of its shifts, the next one past it is added (up to {cp.MAX_EXTENSIONS}), as in the "
          "block-lr sweep. A protocol value far from both methods' best would have favoured "
          "one of them.\n\n")
  out = text + common.markdown_table(
      ["method"] + [f"shared lr {base * 2.0 ** k:g}" for k in shifts], table)
  if len(best_ppl) == len(cp.FIRST):
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


def known_specs(proto: cp.Protocol, get: cp.Lookup) -> set[cp.Spec]:
  """Every run the protocol has asked for so far (rate choices and seeded runs)."""
  seen = set()
  for e in proto.entries:
    if proto.select_seed is None:
      grid, _, best = cp.sweep_state(proto, e, get)
      seen |= {cp.Spec(e, i, proto.seeds[0], proto.sweep_steps) for i in grid}
      if best is not None and e in cp.FIRST:
        seen |= {cp.Spec(e, best, proto.seeds[0], proto.sweep_steps, k)
                 for k in cp.shared_state(proto, e, get)[0]}
    for b in proto.select_steps:
      seen |= {cp.Spec(e, i, proto.select_seed, b)
               for i in cp.selection_state(proto, e, b, get)[0]}
    for b in proto.budgets:
      best = cp.chosen_index(proto, e, b, get)
      if best is not None:
        seen |= {cp.Spec(e, best, s, b) for s in proto.seeds}
  return seen


def finished_and_pending(proto: cp.Protocol, get: cp.Lookup) -> tuple[int, list[cp.Spec]]:
  """Number of finished runs the plan knows of, and the runs of the current stage left."""
  return sum(get(s) is not None for s in known_specs(proto, get)), cp.plan(proto, get)


def _tokens(proto: cp.Protocol, steps: int) -> str:
  return f"{steps} steps ({proto.tokens(steps):,} tokens)"


def protocol_lines(proto: cp.Protocol, first: ml_collections.ConfigDict) -> list[str]:
  """The protocol section's bullets."""
  shared = dict(proto.overrides)["train.shared_lr"]
  seeds = ", ".join(map(str, proto.seeds))
  budgets = ", ".join(_tokens(proto, b) for b in proto.budgets)
  lines = [
      f"- Same for every method: {shared_setup(first)}",
      f"- Validation: the first {pretrain.eval_batch_count(first)} batches of "
      f"{first.train.batch_size} x {first.data.seq_len} positions of the held-out split "
      f"(data.eval_fraction {first.data.eval_fraction:g} of the stdlib documents, chosen by a "
      "hash of their id), identical batches for every method; the tokenizer was trained "
      "only on documents outside that split (tokenizer.training_document_ids). Perplexity "
      "is exp of the token-weighted mean loss."]
  if proto.select_seed is None:
    lines += [
        f"- One peak learning rate for the embedding, LM head and norm scales of every "
        f"method: train.shared_lr = {shared:g} (not tuned per method; the last stage checks "
        "0.5x and 2x for full_rank and LOST, extended past an edge: see the shared "
        "learning-rate check). Only the block (q/k/v/o/gate/up/down) learning rate differs "
        "between methods.",
        f"- Sweep: block lr on the ladder 1e-2 x 2^i, seed {proto.seeds[0]}, "
        f"{_tokens(proto, proto.sweep_steps)}; >= 4 values for full_rank, LOST and CoLA, "
        ">= 3 for the others (the controls: LOST's chosen rate and its two neighbours); a "
        f"best value at a grid edge adds the next value past it (up to {cp.MAX_EXTENSIONS} "
        "times). The chosen rate is reused at every budget.",
        f"- Chosen rate re-run with seeds {seeds} (model init and data order) at {budgets}; "
        f"seed {proto.seeds[0]} at {proto.sweep_steps} steps is also the sweep's selection "
        "run. Schedule length follows the budget. Spread: sample standard deviation and "
        "min-max over seeds; changes at the same seed pair runs that saw the same data "
        "order.",
        "- Parameters: low_rank, CoLA and SLTrain use the rank matching LOST's projection "
        "parameters (configs.matched_rank); GaLore projects at LOST's rank with scale 0.25 "
        f"(its recipe) every {first.train.galore_update_freq} steps; its block lr is the "
        "AdamW lr before that scale. Its recipe's lr 0.01 for the unprojected parameters is "
        "replaced by the shared rate, as for every method.",
        "- Controls: lost_gamma1 (gamma 1: SVD-initialised factors with SiLU, the sparse "
        "branch multiplied by 0, so its values never change) asks whether LOST's gain is "
        "initialisation alone; lost_random_channels draws the kept channels at random from "
        "the same key stream, so every other parameter starts identical to LOST's."]
    return lines
  sel = ", ".join(_tokens(proto, b) for b in proto.select_steps)
  reuse = [f"{_tokens(proto, b)} use the rate chosen at {cp.selection_budget(proto, b)} "
           "steps" for b in proto.budgets if b not in proto.select_steps]
  lines += [
      f"- One peak learning rate for the embedding, LM head and norm scales of every "
      f"method: train.shared_lr = {shared:g}, where the shared-rate check of protocol v1 "
      "(compare_d256_v1.md) found both full_rank and LOST best. Only the block "
      "(q/k/v/o/gate/up/down) learning rate differs between methods.",
      f"- Rate choice: on seed {proto.select_seed}, a selection seed that is not among the "
      f"reported seeds ({seeds}) and is shown only in the rate-choice tables, at {sel}. At "
      "each of these budgets the block lr is bracketed on the ladder 1e-2 x 2^i: the centre "
      "(at the first, v1's chosen rate; after it, the previous budget's choice) and its "
      "neighbours 0.5x and 2x, extended past an edge while the best sits there (up to "
      f"{cp.MAX_EXTENSIONS} times)" + (f"; the runs of {', '.join(reuse)}" if reuse else "")
      + ".",
      f"- Seeds {seeds} (model init and data order) at the chosen rates, at {budgets}; "
      "schedule length follows the budget. Spread: sample standard deviation and min-max "
      "over seeds; changes at the same seed pair runs that saw the same data order.",
      "- Controls: lost_gamma1 (gamma 1: SVD-initialised factors with SiLU, the sparse branch "
      "multiplied by 0) asks whether LOST's gain is its initialised low-rank part alone; "
      "full_rank_kaiming is full_rank whose every dense projection kernel is drawn U(±1/"
      "sqrt(fan_in)) from the key LOST's layer draws its decomposed weight from "
      "(model.linear.dense_init=kaiming), so it starts from the very weights LOST splits: "
      "the other half of the init control (v1's ablation ran LOST on an N(0, 0.02) weight)."]
  return lines


def unrecorded_text(fields) -> str:
  """The note on results of older code whose configs lack `fields` (runs.Store); '' if none."""
  fields = sorted(fields)
  if not fields:
    return ""
  return (f"These results were made by code whose run configs lack {len(fields)} field(s) "
          "added since (" + ", ".join(f"`{f}`" for f in fields) + "); they are matched on "
          "every field they record (runs.Store); the added fields hold their defaults here.\n")


def write_report(proto: cp.Protocol, get: cp.Lookup, *, name: str, out_dir: str, command: str,
                 version: dict | None = None, version_line: str | None = None,
                 results_dir: str | None = None) -> str:
  """Write `<out_dir>/<name>.md`, the plots and `<name>.json`; return the markdown.
  `version`: the code version `get` reads results of (default: this code's), named in the
  page head by `version_line` (default: this checkout's); `results_dir`: where they are."""
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  rows = {b: budget_rows(proto, get, b) for b in proto.budgets}
  # Validation perplexity vs block lr of each rate choice (v1: the sweep).
  choices = ([(proto.sweep_steps, proto.seeds[0], lambda e: cp.sweep_state(proto, e, get),
               f"{base}_sweep.png")] if proto.select_seed is None else
             [(b, proto.select_seed, lambda e, b=b: cp.selection_state(proto, e, b, get),
               f"{base}_select_{b}steps.png") for b in proto.select_steps])
  for steps, seed, state, path in choices:
    pts = {}
    for e in proto.entries:
      grid, todo, _ = state(e)
      got = [(cp.lr_of(i), cp.final_ppl(get(cp.Spec(e, i, seed, steps))))
             for i in grid if i not in todo]
      pts[e] = [got] if got else []
    common.plot_bands(pts, path, f"{name}: block learning rate ({proto.tokens(steps):,} "
                      f"tokens, seed {seed})", xlabel="block learning rate", log_x=True)
  for b in proto.budgets:
    common.plot_bands({e: _curves(r["results"]) for e, r in rows[b].items()},
                      f"{base}_{b}steps.png", f"{name}: chosen rates, "
                      f"{proto.tokens(b):,} tokens (mean, min-max band over seeds)")
  first = cp.spec_config(proto, cp.Spec("lost", 0, proto.seeds[0], proto.final_steps))
  version = version or runs.code_version()
  n_done, todo = finished_and_pending(proto, get)
  status = (f"**Status: {n_done} run(s) finished; "
            + (f"{len(todo)} run(s) left in the current stage (including "
               + ", ".join(map(str, todo[:3]))
               + (", ..." if len(todo) > 3 else "") + "), later stages follow; "
               "every \"pending\" below is a run not yet finished.**"
               if todo else "the comparison is complete.**"))
  where = os.path.relpath(results_dir, out_dir) if results_dir else f"{name}_runs"
  v1 = proto.select_seed is None
  title = (f"# {name}: LOST vs baselines, learning rates tuned per method, "
           f"{len(proto.seeds)} seeds, two budgets (protocol v1)\n" if v1 else
           f"# {name}: full-rank, LOST and their controls at the best shared rate, "
           f"{len(proto.seeds)} seeds, {len(proto.budgets)} budgets (protocol v2)\n")
  parts = [
      title, status + "\n",
      f"Generated by `python -m experiments.compare_methods` from the stored results in "
      f"`{where}/` (one JSON per finished run); the command without --report_only and "
      "--sources_hash resumes the runs and rewrites this document after each one.\n",
      common.page_head(command, version_line),
      "Code version of these results (experiments/runs.code_version; a result is reused "
      f"only under the same version): `{json.dumps(version, sort_keys=True)}`.\n",
      "## Protocol\n", *protocol_lines(proto, first),
      f"\nMeasured on {common.environment()}. tokens/s is the mean over seeds of each run's "
      "median logged window; on this shared CPU it also reflects other load.\n"]
  if v1:
    parts += ["## Learning-rate sweep\n",
              f"Final validation perplexity after {proto.tokens(proto.sweep_steps):,} tokens "
              f"(seed {proto.seeds[0]}); bold: the chosen rate.\n",
              sweep_table(proto, get) + "\n",
              f"![validation perplexity vs block learning rate]({name}_sweep.png)\n"]
  else:
    parts += ["## Rate choice (selection seed)\n",
              f"Final validation perplexity of seed {proto.select_seed} (the selection seed, "
              "reported only here) per block learning rate; bold: the chosen rate.\n"]
    for b in proto.select_steps:
      parts += [f"### {_tokens(proto, b)}\n", selection_table(proto, get, b) + "\n",
                f"![validation perplexity vs block learning rate]({name}_select_{b}steps.png)"
                "\n"]
  summary = {}
  for b in proto.budgets:
    label = ("sweep budget" if v1 and b == proto.sweep_steps else
             "final budget" if v1 else "first budget" if b == proto.sweep_steps else
             f"{b / proto.sweep_steps:g} x the first budget")
    table, rank = budget_table(proto, b, rows[b])
    parts += [f"## {proto.tokens(b):,} tokens ({b} steps, {label})\n", table + "\n",
              " ".join(rank) + "\n", control_text(proto, rows[b]) + "\n",
              f"![validation perplexity vs step]({name}_{b}steps.png)\n"]
    summary[str(b)] = {e: dict(lr=cp.lr_of(r["lr_index"]),
                               seeds=[x["seed"] for x in r["results"]],
                               eval_ppl=[x["eval_ppl"] for x in r["results"]])
                       for e, r in rows[b].items()}
  text, said = statements(proto, rows)
  parts += ["## Ranking, margins and settled pairs (computed from the tables above)\n",
            text + "\n"]
  if v1:
    parts += ["## Shared learning-rate check\n", shared_table(proto, get) + "\n"]
  parts.append(unrecorded_text(getattr(get, "unrecorded", ())))
  parts.append("Methods: " + "; ".join(f"{e}: {cp.ENTRIES[e].what}" for e in proto.entries)
               + ".\n")
  md = "\n".join(p for p in parts if p)
  with open(base + ".md", "w") as f:
    f.write(md)
  with open(base + ".json", "w") as f:
    json.dump({"code_version": version, "budgets": summary, "statements": said}, f, indent=1,
              sort_keys=True)
  return md
