"""The method comparison's documents: tables, spreads, plots and the markdown page, written
from finished runs (the command line is experiments/compare_methods.py).
"""

from __future__ import annotations

import json
import os
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
  for e in cp.ENTRIES:
    best = cp.sweep_state(proto, e, get)[2]
    if best is None:
      continue
    res = [r for r in (get(cp.Spec(e, best, s, steps)) for s in proto.seeds) if r is not None]
    out[e] = dict(lr_index=best, results=res)
  return out


def budget_table(proto: cp.Protocol, rows: dict[str, dict]) -> tuple[str, list[str]]:
  """Markdown table of one budget and the ranking sentence (complete entries only)."""
  n_want = len(proto.seeds)
  ref = None
  if "full_rank" in rows and rows["full_rank"]["results"]:
    ref = common.mean_spread([cp.final_ppl(r) for r in rows["full_rank"]["results"]])["mean"]
  table, complete = [], []
  for e in cp.ENTRIES:
    if e not in rows:
      table.append([e, "pending (sweep)", "", "", "", "", "", ""])
      continue
    row = rows[e]
    res = row["results"]
    lr = f"{cp.lr_of(row['lr_index']):.3g}"
    if not res:
      table.append([e, lr, f"0 of {n_want}", "pending", "", "", "", ""])
      continue
    s = common.mean_spread([cp.final_ppl(r) for r in res])
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
  lost = common.mean_spread([cp.final_ppl(r) for r in rows["lost"]["results"]])
  parts = []
  for c in ("lost_gamma1", "lost_random_channels"):
    res = rows.get(c, {}).get("results")
    if not res:
      parts.append(f"{c}: pending")
      continue
    s = common.mean_spread([cp.final_ppl(r) for r in res])
    verdict = ("ranges do not overlap" if separated(lost, s) else "ranges overlap")
    parts.append(f"{c} {_fmt_ms(s)} (n={s['n']}) vs LOST {_fmt_ms(lost)} (n={lost['n']}), "
                 f"{100 * (s['mean'] / lost['mean'] - 1):+.1f}%, {verdict}")
  return "Controls: " + "; ".join(parts) + "."


def complete_stats(proto: cp.Protocol, rows: dict[str, dict]) -> dict[str, dict]:
  """entry -> mean_spread of its final validation perplexities, for entries with every seed."""
  return {e: common.mean_spread([cp.final_ppl(r) for r in row["results"]])
          for e, row in rows.items() if len(row["results"]) == len(proto.seeds)}


def settled_text(proto: cp.Protocol, rows_by_steps: dict[int, dict[str, dict]]) -> str:
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
  pending = sorted((set(a) ^ set(b)) | (set(cp.ENTRIES) - set(a) - set(b)))
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
      v = cp.final_ppl(result_of(i))
      cells.append(f"**{v:.2f}**" if i == best else f"{v:.2f}")
  return cells


def sweep_table(proto: cp.Protocol, get: cp.Lookup) -> str:
  """Entry x block lr -> final validation perplexity at the sweep budget (seed 0)."""
  states = {e: cp.sweep_state(proto, e, get) for e in cp.ENTRIES}
  cols = sorted({i for g, _, _ in states.values() for i in g})
  table = []
  for e, (grid, todo, best) in states.items():
    cells = _grid_cells(cols, states[e],
                        lambda i: get(cp.Spec(e, i, proto.seeds[0], proto.sweep_steps)))
    if best is None:
      chosen = "pending" if grid else "pending (after LOST's sweep)"
    else:
      edge = best in (grid[0], grid[-1])
      chosen = f"{cp.lr_of(best):.3g}" + (" (at an edge: extensions exhausted)" if edge else "")
    table.append([e] + cells + [chosen])
  return common.markdown_table(["method"] + [f"{cp.lr_of(i):.3g}" for i in cols]
                               + ["chosen block lr"], table)


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


def finished_and_pending(proto: cp.Protocol, get: cp.Lookup) -> tuple[int, list[cp.Spec]]:
  """Number of finished runs the plan knows of, and the runs of the current stage left."""
  seen = set()
  for e in cp.ENTRIES:
    grid, _, best = cp.sweep_state(proto, e, get)
    seen |= {cp.Spec(e, i, proto.seeds[0], proto.sweep_steps) for i in grid}
    if best is not None:
      seen |= {cp.Spec(e, best, s, n) for s in proto.seeds
               for n in (proto.sweep_steps, proto.final_steps)}
      if e in cp.FIRST:
        seen |= {cp.Spec(e, best, proto.seeds[0], proto.sweep_steps, k)
                 for k in cp.shared_state(proto, e, get)[0]}
  return sum(get(s) is not None for s in seen), cp.plan(proto, get)


def write_report(proto: cp.Protocol, get: cp.Lookup, *, name: str, out_dir: str, command: str,
                 version: dict | None = None) -> str:
  """Write `<out_dir>/<name>.md`, the plots and `<name>.json`; return the markdown.
  `version`: the code version `get` reads results of (default: this code's)."""
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  budgets = [(proto.sweep_steps, "sweep budget"), (proto.final_steps, "final budget")]
  rows = {steps: budget_rows(proto, get, steps) for steps, _ in budgets}
  # Validation-perplexity-vs-lr plot of the sweep.
  sweep_pts = {}
  for e in cp.ENTRIES:
    grid, todo, _ = cp.sweep_state(proto, e, get)
    pts = [(cp.lr_of(i), cp.final_ppl(get(cp.Spec(e, i, proto.seeds[0], proto.sweep_steps))))
           for i in grid if i not in todo]
    sweep_pts[e] = [pts] if pts else []
  common.plot_bands(sweep_pts, base + "_sweep.png", f"{name}: learning-rate sweep "
                    f"({proto.tokens(proto.sweep_steps):,} tokens, seed {proto.seeds[0]})",
                    xlabel="block learning rate", log_x=True)
  for steps, _ in budgets:
    common.plot_bands({e: _curves(r["results"]) for e, r in rows[steps].items()},
                      f"{base}_{steps}steps.png", f"{name}: chosen rates, "
                      f"{proto.tokens(steps):,} tokens (mean, min-max band over seeds)")
  first = cp.spec_config(proto, cp.Spec("lost", 0, proto.seeds[0], proto.final_steps))
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
      "Generated by `python -m experiments.compare_methods` from the stored results in "
      f"`{os.path.basename(base)}_runs/` (one JSON per finished run); the command resumes the "
      "sweep and rewrites this document after each run.\n",
      common.page_head(command),
      "Code version of these results (experiments/runs.code_version; a result is reused "
      f"only under the same version): `{json.dumps(version, sort_keys=True)}`.\n",
      "## Protocol\n",
      f"- Same for every method: {shared_setup(first)}",
      f"- Validation: the first {pretrain.eval_batch_count(first)} batches of {first.train.batch_size}"
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
      f"(up to {cp.MAX_EXTENSIONS} times).",
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
    summary[str(steps)] = {e: dict(lr=cp.lr_of(r["lr_index"]),
                                   seeds=[x["seed"] for x in r["results"]],
                                   eval_ppl=[x["eval_ppl"] for x in r["results"]])
                           for e, r in rows[steps].items()}
  parts += ["## Has the ranking settled?\n",
            settled_text(proto, {steps: rows[steps] for steps, _ in budgets}) + "\n",
            "## Shared learning-rate check\n", shared_table(proto, get) + "\n"]
  parts.append("Methods: " + "; ".join(f"{e}: {x.what}" for e, x in cp.ENTRIES.items()) + ".\n")
  md = "\n".join(parts)
  with open(base + ".md", "w") as f:
    f.write(md)
  with open(base + ".json", "w") as f:
    json.dump({"code_version": version, "budgets": summary}, f, indent=1, sort_keys=True)
  return md
