"""LOST's ablations at LOST's tuned learning rate, 2 seeds, under the comparison's protocol.

  nice -n 19 python -m experiments.ablate_lost [--name=ablate_d256] [--lr=0]
  python -m experiments.ablate_lost --report_only [--sources_hash=HASH]   # from stored runs

Every variant is LOST under experiments.compare_protocol.D256 (same model, data, batch,
schedule, shared lr, evaluation) at the sweep budget, with the block learning rate chosen by
LOST's sweep in compare_methods (or --lr), seeds 0 and 1, then the variant's own fields
(ABLATIONS): gamma, sparsity rho, activation, channel choice (complement / weight / random),
factor init and the initializer of the decomposed weight. Runs are cached by full config and
code version (experiments/runs.py), so LOST's own row and the variants shared with the
comparison's controls are not trained twice. Writes `<out_dir>/<name>.md`, `.png`, `.json`.

Every variant runs at LOST's rate, not its own: the page says so on every row and, for the
variants whose nearest tuned method in the comparison chose another rate (RATE_NEIGHBOURS),
what that mixes in, read from the comparison's JSON.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable

import ml_collections

from experiments import common, compare_report, runs
from experiments import compare_protocol as cp

# variant -> (fields set on LOST, what the row tests). "lost" is the reference.
ABLATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "lost": ({}, "LOST as specified: SVD factors, S from the SVD complement, rho 0.01, "
             "gamma 0.7, SiLU, kaiming"),
    "gamma=0.3": ({"model.linear.gamma": 0.3}, "mixing weight of the low-rank branch"),
    "gamma=0.5": ({"model.linear.gamma": 0.5}, "mixing weight of the low-rank branch"),
    "gamma=0.9": ({"model.linear.gamma": 0.9}, "mixing weight of the low-rank branch"),
    "gamma=1": ({"model.linear.gamma": 1.0}, "no sparse branch (SVD-initialised low-rank "
                "with SiLU)"),
    "sparsity=0.03": ({"model.linear.sparsity": 0.03}, "rho: 3% of input channels kept"),
    "sparsity=0.1": ({"model.linear.sparsity": 0.1}, "rho: 10% of input channels kept"),
    "activation=identity": ({"model.linear.activation": "identity"},
                            "no SiLU between the factors"),
    "sparse_init=weight": ({"model.linear.sparse_init": "weight"},
                           "channels by complement norm, S = rows of the full initial weight "
                           "(the port's reading)"),
    "sparse_init=random_channels": ({"model.linear.sparse_init": "random_channels"},
                                    "channels drawn at random (same key stream), S = rows of "
                                    "the initial weight"),
    "factor_init=random": ({"model.linear.factor_init": "random"},
                           "random factors of the same shapes (CoLA's scale) instead of "
                           "the top-r SVD; S unchanged"),
    "init=normal": ({"model.linear.init": "normal"},
                    "the decomposed full-rank weight drawn N(0, init_std) (LLaMA's init, the "
                    "port's) instead of kaiming U(+-1/sqrt(n))"),
}
REFERENCE = "lost"
SEEDS = (0, 1)
# variant -> (the comparison entry nearest to it with its own tuned rate, whether that entry
# is the same model). gamma=1 is lost_gamma1 itself (the same config, test_experiments).
RATE_NEIGHBOURS = {"activation=identity": ("low_rank", False),
                   "factor_init=random": ("cola", False),
                   "gamma=1": ("lost_gamma1", True)}


def variant_config(proto: cp.Protocol, variant: str, lr: float,
                   seed: int) -> ml_collections.ConfigDict:
  """The run config of one ablation variant (validated): LOST's comparison config at `lr`,
  `seed` and the sweep budget, then the variant's fields."""
  if variant not in ABLATIONS:
    raise ValueError(f"unknown ablation {variant!r}. Fix: use one of {tuple(ABLATIONS)}.")
  return cp.protocol_config(proto, "lost", ABLATIONS[variant][0], lr=lr, seed=seed,
                            steps=proto.sweep_steps, name=variant)


def stored(proto: cp.Protocol, variants: Iterable[str], *, lr: float, get,
           seeds: Iterable[int] = SEEDS) -> dict[str, list[dict]]:
  """variant -> its finished results (seed order) found by `get` (config -> result or None,
  e.g. runs.Store); variants with none are left out."""
  out = {}
  for v in variants:
    found = [r for r in (get(variant_config(proto, v, lr, seed)) for seed in seeds) if r]
    if found:
      out[v] = found
  return out


def run(proto: cp.Protocol, variants: Iterable[str], *, lr: float, name: str,
        results_dir: str, workdir_root: str, out_dir: str = "docs/results",
        seeds: Iterable[int] = SEEDS, command: str = "", quiet: bool = True,
        compare_json: str = "",
        log: Callable[[str], None] = print) -> dict[str, list[dict]]:
  """Train (or reuse) every variant x seed, then write `<out_dir>/<name>.{md,png,json}`."""
  variants, seeds = list(variants), list(seeds)
  out: dict[str, list[dict]] = {}
  for seed in seeds:            # seed 0 of every variant first: a first complete picture
    for variant in variants:
      cfg = variant_config(proto, variant, lr, seed)
      result = runs.run(cfg, workdir_root, results_dir=results_dir, quiet=quiet)
      common.drop_checkpoints(workdir_root, result["key"])
      out.setdefault(variant, []).append(result)
      log(f"[{name}] {variant} seed {seed}: final validation perplexity "
          f"{result['eval_ppl']:.3f}")
      write(proto, out, lr=lr, name=name, out_dir=out_dir, command=command, seeds=seeds,
            compare_json=compare_json)
  return out


def write(proto, results: dict[str, list[dict]], *, lr: float, name: str, out_dir: str,
          command: str, seeds: list[int], version: dict | None = None,
          version_line: str | None = None, compare_json: str = "",
          unrecorded: Iterable[str] = ()) -> None:
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  common.plot_bands({v: [[(s, p) for s, _, p in r["eval_curve"]] for r in rs]
                     for v, rs in results.items()}, base + ".png",
                    f"{name}: validation perplexity (mean, min-max over seeds)")
  with open(base + ".md", "w") as f:
    f.write(report(proto, results, lr=lr, name=name, command=command, seeds=seeds,
                   version=version, version_line=version_line, compare_json=compare_json,
                   unrecorded=unrecorded))
  with open(base + ".json", "w") as f:
    json.dump({v: [dict(seed=r["seed"], eval_ppl=r["eval_ppl"], key=r["key"]) for r in rs]
               for v, rs in results.items()}, f, indent=1)


def rate_text(results: dict[str, list[dict]], lr: float, budget: dict,
              compare_name: str) -> str:
  """What running every variant at LOST's rate `lr` mixes in: for each variant of
  RATE_NEIGHBOURS with results, the rate its nearest tuned method chose at the same budget
  (`budget`: entry -> {lr, eval_ppl} of the comparison's JSON) and, where that method is the
  same model, its gap to LOST at its own rate."""
  if not budget or REFERENCE not in results:
    return ""
  mean = lambda xs: sum(xs) / len(xs)
  ref = mean([r["eval_ppl"] for r in results[REFERENCE]])
  parts = []
  for v, (entry, same) in RATE_NEIGHBOURS.items():
    if v not in results or entry not in budget:
      continue
    here = 100 * (mean([r["eval_ppl"] for r in results[v]]) / ref - 1)
    own = budget[entry]["lr"]
    text = (f"{v} ({here:+.1f}% here, {len(results[v])} seeds): {entry} chose {own:.3g} in the "
            f"comparison, {lr / own:.3g}x below the {lr:g} used here")
    if same:
      lost = budget[REFERENCE]
      gap = 100 * (mean(budget[entry]["eval_ppl"]) / mean(lost["eval_ppl"]) - 1)
      text += (f"; at that rate the same model was {gap:+.1f}% against LOST "
               f"({len(budget[entry]['eval_ppl'])} seeds)")
    parts.append(text)
  if not parts:
    return ""
  return (f"Every row runs at LOST's block rate {lr:g}, so a large gap mixes the variant's "
          "effect with a rate that may be far from the variant's own best. The rates the "
          f"nearest tuned methods chose at the same budget ({compare_name}): "
          + "; ".join(parts) + ". Where a variant's own best rate is nearer those, its gap "
          "here overstates what the variant itself costs.\n")


def report(proto, results: dict[str, list[dict]], *, lr: float, name: str, command: str,
           seeds: list[int], version: dict | None = None, version_line: str | None = None,
           compare_json: str = "", unrecorded: Iterable[str] = ()) -> str:
  """The markdown document of an ablation (`version`: the code version of the results,
  named by `version_line` in the page head; defaults: this checkout's)."""
  stats = {v: common.mean_spread([r["eval_ppl"] for r in rs]) for v, rs in results.items()}
  ref = stats.get(REFERENCE)
  at = f"{lr:g} (LOST's)"
  table = []
  for v in ABLATIONS:
    if v not in stats:
      table.append([v, ABLATIONS[v][1], at, "", "pending", "", "", "", ""])
      continue
    s = stats[v]
    p = results[v][0]["params"]
    ms = f"{s['mean']:.2f} ± {s['std']:.2f}" if s["n"] > 1 else f"{s['mean']:.2f}"
    delta = f"{100 * (s['mean'] / ref['mean'] - 1):+.1f}%" if ref else "-"
    apart = ("" if not ref or v == REFERENCE else
             "apart" if compare_report.separated(s, ref) else "overlap")
    table.append([v, ABLATIONS[v][1], at, f"{s['n']} of {len(seeds)}", f"**{ms}**",
                  f"{s['min']:.2f} – {s['max']:.2f}", delta, apart,
                  f"{p['projections'] / 1e6:.3f}"])
  header = ["variant", "what changes", "block lr", "seeds", "val ppl mean ± std", "min – max",
            "vs LOST (mean)", "seed ranges vs LOST", "projection params (M)"]
  first = variant_config(proto, REFERENCE, lr, seeds[0])
  compare = {}
  if compare_json and os.path.exists(compare_json):
    with open(compare_json) as f:
      compare = json.load(f)
  parts = [
      f"# {name}: LOST ablations, every variant at LOST's block rate {lr:g}\n",
      common.page_head(command, version_line),
      f"Protocol: experiments/compare_methods.py (protocol v1, D256): "
      f"{compare_report.shared_setup(first)} {proto.sweep_steps} steps "
      f"({proto.tokens(proto.sweep_steps):,} tokens); block learning rate {lr:g} for every "
      f"variant (LOST's chosen rate in the comparison's sweep, not tuned per variant), "
      f"shared learning rate {first.train.shared_lr:g}; seeds {', '.join(map(str, seeds))}.\n",
      f"Measured on {common.environment()}. Code version of these results (a result is "
      f"reused only under the same one): "
      f"`{json.dumps(version or runs.code_version(), sort_keys=True)}`.\n",
      common.markdown_table(header, table) + "\n",
      f"\"apart\": the variant's {len(seeds)} seeds and LOST's have min-max ranges that do "
      f"not overlap; with {len(seeds)} seeds each that is a weak criterion, and a gap whose "
      "ranges overlap (\"overlap\") is not an established difference.\n",
      rate_text(results, lr, compare.get("budgets", {}).get(str(proto.sweep_steps), {}),
                os.path.basename(compare_json)),
      f"![validation perplexity vs step]({name}.png)\n",
      compare_report.unrecorded_text(unrecorded),
  ]
  return "\n".join(p for p in parts if p)


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  common.check_names(f.ablations, ABLATIONS, "ablations")
  proto = cp.D256
  results_dir = f.results_dir or f.compare_results_dir
  version, version_line = common.results_version(f.sources_hash, f.report_only)
  lr = f.lr or cp.tuned_lr(proto, f.compare_results_dir, version=version)
  if lr is None:
    print(f"error: LOST's learning-rate sweep in {f.compare_results_dir} has not finished. "
          "Fix: run python -m experiments.compare_methods --protocol=v1 first, or give --lr.",
          file=sys.stderr)
    sys.exit(2)
  if f.report_only:
    store = runs.Store(results_dir, version)
    results = stored(proto, f.ablations, lr=lr, get=store)
    write(proto, results, lr=lr, name=f.name, out_dir=f.out_dir,
          command=common.command_line(), seeds=list(SEEDS), version=version,
          version_line=version_line, compare_json=f.compare_json,
          unrecorded=store.unrecorded)
    return
  run(proto, f.ablations, lr=lr, name=f.name, results_dir=results_dir,
      workdir_root=os.path.join(f.workdir_root, f.name), out_dir=f.out_dir,
      command=common.command_line(), quiet=f.quiet, compare_json=f.compare_json)


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("ablations", list(ABLATIONS), "Variants to run (ABLATIONS).")
  flags.DEFINE_string("name", "ablate_d256", "Name of the ablation: document file names.")
  flags.DEFINE_string("out_dir", "docs/results", "Where <name>.md/.json/.png are written.")
  flags.DEFINE_string("results_dir", "", "Finished runs as <key>.json (default: the "
                      "comparison's, docs/results/compare_d256_v1_runs, so shared runs are "
                      "reused).")
  flags.DEFINE_string("compare_results_dir", "docs/results/compare_d256_v1_runs",
                      "The comparison's (protocol v1) runs, read for LOST's chosen learning "
                      "rate.")
  flags.DEFINE_string("compare_json", "docs/results/compare_d256_v1.json",
                      "The comparison's (protocol v1) summary, read for the rates the "
                      "variants' nearest tuned methods chose.")
  flags.DEFINE_bool("report_only", False, "Only regenerate the documents from stored runs.")
  flags.DEFINE_string("sources_hash", "", "With --report_only: report the results made by "
                      "the code whose sources hash this is (runs.code_version).")
  flags.DEFINE_string("workdir_root", "/tmp/lost_jax_runs", "Checkpoints of runs in progress.")
  flags.DEFINE_float("lr", 0.0, "Block learning rate (0: LOST's chosen rate of the sweep).")
  flags.DEFINE_bool("quiet", True, "No per-step progress lines.")
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, _main)
