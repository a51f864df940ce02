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

import os
import sys
from typing import Callable

from experiments import common, runs
from experiments import compare_protocol as cp
from experiments import compare_report


def sweep(proto: cp.Protocol, *, name: str, results_dir: str, workdir_root: str, out_dir: str,
          command: str, max_runs: int = 0, quiet: bool = True,
          log: Callable[[str], None] = print) -> int:
  """Run the plan until it is empty (or `max_runs` runs), rewriting the documents after each
  run; return the number of runs trained."""
  get = cp.make_lookup(proto, results_dir)
  done = 0
  while not max_runs or done < max_runs:
    todo = cp.plan(proto, get)
    if not todo:
      break
    # The stage's runs in their (interleaved) order; plan again once they are done, since
    # finished sweeps may extend a grid or open the next stage.
    for n, spec in enumerate(todo):
      if max_runs and done >= max_runs:
        break
      if get(spec) is not None:
        continue
      cfg = cp.spec_config(proto, spec)
      log(f"[{name}] run {done + 1}: {spec} ({len(todo) - n} left in this stage)")
      result = runs.run(cfg, workdir_root, results_dir=results_dir, quiet=quiet)
      common.drop_checkpoints(workdir_root, result["key"])
      log(f"[{name}] {spec}: validation perplexity {result['eval_ppl']:.3f} "
          f"({result['wall_s'] / 60:.1f} min) -> {result['key']}.json")
      done += 1
      compare_report.write_report(proto, get, name=name, out_dir=out_dir, command=command)
  compare_report.write_report(proto, get, name=name, out_dir=out_dir, command=command)
  return done


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
  get = cp.make_lookup(cp.D256, results_dir, version)
  if f.dry_run:
    for spec in cp.plan(cp.D256, get):
      print(spec.entry, cp.lr_of(spec.lr_index), spec.seed, spec.steps)
    return
  if f.report_only:
    name_arg = f" --name={f.name}" if f.name != "compare_d256" else ""
    compare_report.write_report(cp.D256, get, name=f.name, out_dir=f.out_dir, version=version,
                                command="python -m experiments.compare_methods" + name_arg)
    return
  n = sweep(cp.D256, name=f.name, results_dir=results_dir, workdir_root=workdir_root,
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
