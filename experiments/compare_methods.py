"""A fair comparison of LOST with its baselines: learning-rate choices, seeds, budgets.

  nice -n 19 python -m experiments.compare_methods [--protocol=v2] [--max_runs=N]
  python -m experiments.compare_methods --report_only      # documents from finished runs
  python -m experiments.compare_methods --protocol=v1 --report_only --sources_hash=HASH

Two protocols (experiments/compare_protocol.py, written out at the top of each document):
- v1 (page compare_d256_v1): full_rank, LOST, low_rank, CoLA, SLTrain, GaLore and two LOST
  controls at one shared embedding / head / norm rate 0.0025; block rates swept on seed 0 at
  ~1M tokens (a factor-2 ladder lr_i = 1e-2 x 2^i, extended past an edge), then seeds 0, 1,
  2 at ~1M and ~2M tokens, then a check of the shared rate (0.5x and 2x for full_rank and
  LOST, extended past an edge).
- v2 (page compare_d256, the default): full_rank, LOST, lost_gamma1 and full_rank with
  LOST's kaiming init at the shared rate v1's check found best for both (0.005); block rates
  chosen on a selection seed (3) that is not reported with the others, at ~1M and again at
  ~2M tokens (each the previous choice and its 0.5x / 2x neighbours, extended past an edge),
  then seeds 0, 1, 2 at ~1M, ~2M and ~8M tokens (8M at the 2M choice). Order: 1M for every
  entry, then 2M, then 8M, seeds interleaved, so partial results are usable early.
Same for every run: model shape (d_model 256, ffn 688, 4 layers, 4 heads, vocab 4096), data
(stdlib corpus, packed rows of 256 tokens, same shuffle), batch (16 x 256 tokens), schedule
shape (10% linear warmup, cosine to 0.1 x peak), AdamW b1 0.9 / b2 0.95, clip 1, no weight
decay, float32, and evaluation (the same >= 200k held-out tokens, whose documents the
tokenizer never saw).

Every finished run is stored as `<results_dir>/<key>.json` keyed by its full config and the
code version (experiments/runs.py): re-running resumes, reuses only results of the same code
and regenerates the documents after every run. --sources_hash reports results of older code
(runs.Store), naming the commit they were made on.
"""

from __future__ import annotations

import os
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
      compare_report.write_report(proto, get, name=name, out_dir=out_dir, command=command,
                                  results_dir=results_dir)
  compare_report.write_report(proto, get, name=name, out_dir=out_dir, command=command,
                              results_dir=results_dir)
  return done


DEFAULT_NAMES = {"v1": "compare_d256_v1", "v2": "compare_d256"}


def dry_run_text(proto: cp.Protocol, get: cp.Lookup, name: str) -> str:
  """The runs still to do: every run of the current stage, then one line per later stage
  (rates provisional: cp.projected_stages), and the count per budget."""
  stages = cp.projected_stages(proto, get)
  if not stages:
    return f"[{name}] nothing to run: the comparison is complete."
  lines = [f"[{name}] current stage, {len(stages[0])} run(s) (entry, block lr, seed, steps, "
           "tokens):"]
  lines += [f"  {s.entry} {cp.lr_of(s.lr_index):.4g} {s.seed} {s.steps} "
            f"{proto.tokens(s.steps):,}" for s in stages[0]]
  lines.append("stages after it (if every rate choice lands inside its first bracket):")
  for k, stage in enumerate(stages[1:], 2):
    steps = sorted({s.steps for s in stage})
    seeds = sorted({s.seed for s in stage})
    lines.append(f"  stage {k}: {len(stage)} run(s) at {', '.join(map(str, steps))} steps, "
                 f"seed(s) {', '.join(map(str, seeds))}")
  per_budget = {}
  for s in (s for stage in stages for s in stage):
    per_budget[s.steps] = per_budget.get(s.steps, 0) + 1
  lines.append("runs left per budget: " + ", ".join(
      f"{proto.tokens(b):,} tokens: {n}" for b, n in sorted(per_budget.items()))
      + f"; {sum(per_budget.values())} in all")
  return "\n".join(lines)


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  proto = cp.PROTOCOLS[f.protocol]
  name = f.name or DEFAULT_NAMES[f.protocol]
  results_dir = f.results_dir or os.path.join(f.out_dir, name + "_runs")
  workdir_root = os.path.join(f.workdir_root, name)
  command = common.command_line()
  version, version_line = common.results_version(f.sources_hash, f.report_only)
  get = cp.make_lookup(proto, results_dir, version)
  if f.dry_run:
    print(dry_run_text(proto, get, name))
    return
  if f.report_only:
    compare_report.write_report(proto, get, name=name, out_dir=f.out_dir, version=version,
                                version_line=version_line, command=command,
                                results_dir=results_dir)
    return
  n = sweep(proto, name=name, results_dir=results_dir, workdir_root=workdir_root,
            out_dir=f.out_dir, command=command, max_runs=f.max_runs, quiet=f.quiet)
  print(f"[{name}] trained {n} run(s); documents in {f.out_dir}/{name}.md")


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("protocol", "v2", list(cp.PROTOCOLS), "The comparison's protocol "
                    "(experiments/compare_protocol.py PROTOCOLS).")
  flags.DEFINE_string("name", "", "Name of the comparison: document file names (default: "
                      "compare_d256 for v2, compare_d256_v1 for v1).")
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
