"""LOST's ablations at LOST's tuned learning rate, 2 seeds, under the comparison's protocol.

  nice -n 19 python -m experiments.ablate_lost [--name=ablate_d256] [--lr=0]

Every variant is LOST under experiments.compare_protocol.D256 (same model, data, batch,
schedule, shared lr, evaluation) at the sweep budget, with the block learning rate chosen by
LOST's sweep in compare_methods (or --lr), seeds 0 and 1, then the variant's own fields
(ABLATIONS): gamma, sparsity rho, activation, channel choice (complement / weight / random),
factor init and the initializer of the decomposed weight. Runs are cached by full config and
code version (experiments/runs.py), so LOST's own row and the variants shared with the
comparison's controls are not trained twice. Writes `<out_dir>/<name>.md`, `.png`, `.json`.
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


def variant_config(proto: cp.Protocol, variant: str, lr: float,
                   seed: int) -> ml_collections.ConfigDict:
  """The run config of one ablation variant (validated): LOST's comparison config at `lr`,
  `seed` and the sweep budget, then the variant's fields."""
  if variant not in ABLATIONS:
    raise ValueError(f"unknown ablation {variant!r}. Fix: use one of {tuple(ABLATIONS)}.")
  return cp.protocol_config(proto, "lost", ABLATIONS[variant][0], lr=lr, seed=seed,
                            steps=proto.sweep_steps, name=variant)


def run(proto: cp.Protocol, variants: Iterable[str], *, lr: float, name: str,
        results_dir: str, workdir_root: str, out_dir: str = "docs/results",
        seeds: Iterable[int] = SEEDS, command: str = "", quiet: bool = True,
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
      write(proto, out, lr=lr, name=name, out_dir=out_dir, command=command, seeds=seeds)
  return out


def write(proto, results: dict[str, list[dict]], *, lr: float, name: str, out_dir: str,
          command: str, seeds: list[int]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  common.plot_bands({v: [[(s, p) for s, _, p in r["eval_curve"]] for r in rs]
                     for v, rs in results.items()}, base + ".png",
                    f"{name}: validation perplexity (mean, min-max over seeds)")
  with open(base + ".md", "w") as f:
    f.write(report(proto, results, lr=lr, name=name, command=command, seeds=seeds))
  with open(base + ".json", "w") as f:
    json.dump({v: [dict(seed=r["seed"], eval_ppl=r["eval_ppl"], key=r["key"]) for r in rs]
               for v, rs in results.items()}, f, indent=1)


def report(proto, results: dict[str, list[dict]], *, lr: float, name: str, command: str,
           seeds: list[int]) -> str:
  """The markdown document of an ablation."""
  stats = {v: common.mean_spread([r["eval_ppl"] for r in rs]) for v, rs in results.items()}
  ref = stats.get(REFERENCE)
  table = []
  for v in ABLATIONS:
    if v not in stats:
      table.append([v, ABLATIONS[v][1], "", "pending", "", "", "", ""])
      continue
    s = stats[v]
    p = results[v][0]["params"]
    ms = f"{s['mean']:.2f} ± {s['std']:.2f}" if s["n"] > 1 else f"{s['mean']:.2f}"
    delta = f"{100 * (s['mean'] / ref['mean'] - 1):+.1f}%" if ref else "-"
    apart = ("" if not ref or v == REFERENCE else
             "apart" if compare_report.separated(s, ref) else "overlap")
    table.append([v, ABLATIONS[v][1], f"{s['n']} of {len(seeds)}", f"**{ms}**",
                  f"{s['min']:.2f} – {s['max']:.2f}", delta, apart,
                  f"{p['projections'] / 1e6:.3f}"])
  header = ["variant", "what changes", "seeds", "val ppl mean ± std", "min – max",
            "vs LOST (mean)", "seed ranges vs LOST", "projection params (M)"]
  first = variant_config(proto, REFERENCE, lr, seeds[0])
  parts = [
      f"# {name}: LOST ablations at LOST's tuned learning rate\n",
      common.page_head(command),
      f"Protocol: experiments/compare_methods.py (D256): {compare_report.shared_setup(first)} "
      f"{proto.sweep_steps} steps ({proto.tokens(proto.sweep_steps):,} tokens); block "
      f"learning rate {lr:g} (LOST's chosen rate in the comparison's sweep), shared "
      f"learning rate {first.train.shared_lr:g}; seeds {', '.join(map(str, seeds))}.\n",
      f"Measured on {common.environment()}. Code version of these results (a result is "
      f"reused only under the same one): `{json.dumps(runs.code_version(), sort_keys=True)}`.\n",
      common.markdown_table(header, table) + "\n",
      "A gap whose seed min-max ranges overlap LOST's (\"overlap\") is not an established "
      "difference.\n",
      f"![validation perplexity vs step]({name}.png)\n",
  ]
  return "\n".join(parts)


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  common.check_names(f.ablations, ABLATIONS, "ablations")
  proto = cp.D256
  results_dir = f.results_dir or f.compare_results_dir
  lr = f.lr or cp.tuned_lr(proto, f.compare_results_dir)
  if lr is None:
    print(f"error: LOST's learning-rate sweep in {f.compare_results_dir} has not finished. "
          "Fix: run python -m experiments.compare_methods first, or give --lr.", file=sys.stderr)
    sys.exit(2)
  run(proto, f.ablations, lr=lr, name=f.name, results_dir=results_dir,
      workdir_root=os.path.join(f.workdir_root, f.name), out_dir=f.out_dir,
      command=common.command_line(), quiet=f.quiet)


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("ablations", list(ABLATIONS), "Variants to run (ABLATIONS).")
  flags.DEFINE_string("name", "ablate_d256", "Name of the ablation: document file names.")
  flags.DEFINE_string("out_dir", "docs/results", "Where <name>.md/.json/.png are written.")
  flags.DEFINE_string("results_dir", "", "Finished runs as <key>.json (default: the "
                      "comparison's, <out_dir>/compare_d256_runs, so shared runs are reused).")
  flags.DEFINE_string("compare_results_dir", "docs/results/compare_d256_runs",
                      "The comparison's runs, read for LOST's chosen learning rate.")
  flags.DEFINE_string("workdir_root", "/tmp/lost_jax_runs", "Checkpoints of runs in progress.")
  flags.DEFINE_float("lr", 0.0, "Block learning rate (0: LOST's chosen rate of the sweep).")
  flags.DEFINE_bool("quiet", True, "No per-step progress lines.")
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, _main)
