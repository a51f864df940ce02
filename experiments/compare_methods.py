"""Train every method on the same data, steps, seed and parameter budget; tabulate and plot.

  python experiments/compare_methods.py --config=configs/pretrain.py:quickstart \
      --methods=full_rank,lost,low_rank,cola,sltrain,galore --name=my_comparison \
      [--config.train.steps=200 ...] [--per_method=galore:train.lr=4e-3 ...]

`--config` names a size only; each method's preset is `pretrain_config(size, method)` with
every `--config.*` override re-applied to it, so one override changes all methods alike.
`--config.model.linear.rank` is LOST's rank: low_rank / cola / sltrain get the rank matching
LOST's projection parameters on the overridden model shape, GaLore projects at LOST's rank
(experiments.common.method_config). `--per_method=method:key=value` sets a field for one
method only (e.g. its learning rate) and is applied last.

Each method trains in `<workdir_root>/<name>/<method>`; re-running skips finished methods and
resumes interrupted ones. Writes `<out_dir>/<name>.md` (table, ranking, command),
`<out_dir>/<name>.png` (validation perplexity vs step) and `<out_dir>/<name>.json`.
Peak memory is XLA's memory_analysis of the compiled train step (experiments.memory.measure:
arguments + temporaries + outputs - donated aliases), beside accounting.memory_estimate.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # run as a file: make the repo root (`experiments`) importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position

from experiments import common, memory  # pylint: disable=wrong-import-position
from lost_jax import accounting, configs, train  # pylint: disable=wrong-import-position

MIB = 2 ** 20


def step_memory(cfg: ml_collections.ConfigDict) -> dict:
  """Bytes of cfg's compiled train step on this host (XLA) and the closed-form estimate."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  train.apply_precision(cfg)
  m = memory.measure(cfg, jax.devices()[:1])
  return dict(memory_xla=m["argument"] + m["temp"] + m["output"] - m["alias"],
              memory_argument=m["argument"], memory_temp=m["temp"])


def build_configs(size: str, methods: Iterable[str], overrides: dict[str, Any] | None = None,
                  method_overrides: dict[str, dict[str, str]] | None = None
                  ) -> dict[str, ml_collections.ConfigDict]:
  """method -> validated run config; every check runs before anything trains."""
  out = {}
  for method in methods:
    cfg = common.method_config(size, method, overrides, (method_overrides or {}).get(method))
    check = ml_collections.ConfigDict(cfg.to_dict())
    train.apply_precision(check)
    train.validate(check)
    out[method] = cfg
  return out


def run(size: str, methods: Iterable[str], *, name: str, workdir_root: str,
        overrides: dict[str, Any] | None = None,
        method_overrides: dict[str, dict[str, str]] | None = None,
        out_dir: str = "docs/results", command: str = "", quiet: bool = True,
        measure_memory: bool = True, log: Callable[[str], None] = print) -> list[dict]:
  """Train (or reuse) every method, then write `<out_dir>/<name>.{md,png,json}`; rows in order."""
  cfgs = build_configs(size, methods, overrides, method_overrides)
  rows = []
  for method, cfg in cfgs.items():
    workdir = os.path.join(workdir_root, name, method)
    log(f"[{name}] {method}: {describe(cfg)} -> {workdir}")
    result = common.run(cfg, workdir, quiet=quiet,
                        measure=step_memory if measure_memory else None)
    rows.append(dict(method=method, config=cfg.to_dict(), **result))
    log(f"[{name}] {method}: final validation perplexity {result['eval_ppl']:.2f}")
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  common.plot_eval_ppl({r["method"]: r["workdir"] for r in rows}, base + ".png",
                       title=f"{name}: validation perplexity")
  with open(base + ".md", "w") as f:
    f.write(report(rows, cfgs, name, command, method_overrides))
  with open(base + ".json", "w") as f:
    json.dump([{k: v for k, v in r.items() if k != "workdir"} for r in rows], f, indent=1)
  return rows


def describe(cfg: ml_collections.ConfigDict) -> str:
  """'lost r=64, adamw lr 3e-03 b2 0.95' style summary of what differs between methods."""
  lin, t = cfg.model.linear, cfg.train
  layer = lin.kind if lin.kind == "dense" else f"{lin.kind} r={lin.rank}"
  opt = t.optimizer
  if opt == "galore":
    opt += f" (rank {t.galore_rank}, scale {t.galore_scale}, every {t.galore_update_freq})"
  return f"{layer}, {opt} lr {t.lr:g} b2 {t.b2:g}"


def _ordinal(i: int) -> str:
  return {1: "1st", 2: "2nd", 3: "3rd"}.get(i, f"{i}th")


def ranking_text(rows: list[dict]) -> str:
  """The order by final validation perplexity, LOST's place and gaps to full-rank."""
  pairs = [(r["method"], r["eval_ppl"]) for r in rows]
  text = common.ranking_text(pairs, reference="full_rank", reference_label="full-rank")
  names = [n for n, _ in common.ranking(pairs)]
  if "lost" in names:
    text += f" LOST is {_ordinal(names.index('lost') + 1)} of {len(names)}."
  return text


def _estimate(cfg: ml_collections.ConfigDict) -> dict:
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  train.apply_precision(cfg)
  return accounting.memory_estimate(cfg)


def report(rows: list[dict], cfgs: dict[str, ml_collections.ConfigDict], name: str,
           command: str, method_overrides: dict[str, dict[str, str]] | None = None) -> str:
  """The markdown document of a comparison."""
  table = []
  for r in rows:
    p = r["params"]
    est = _estimate(cfgs[r["method"]])
    states = est["weights"] + est["gradients"] + est["optimizer"]
    mem = (f"{r['memory_xla'] / MIB:.1f}" if "memory_xla" in r else "-",
           f"{est['total'] / MIB:.1f} ({states / MIB:.1f} + {est['activations'] / MIB:.1f})")
    table.append([r["method"], describe(cfgs[r["method"]]), f"{p['trainable'] / 1e6:.3f}",
                  f"{p['projections'] / 1e6:.3f}", f"{r['eval_loss']:.4f}",
                  f"**{r['eval_ppl']:.2f}**", f"{r['tokens_per_s']:,.0f}", *mem])
  header = ["method", "layer / optimizer", "trainable params (M)", "of which projections (M)",
            "final val loss", "final val ppl", "train tokens/s (median)",
            "step memory, XLA (MiB)",
            "estimate (MiB): weights, grads, optimizer + activations"]
  first = next(iter(cfgs.values()))
  parts = [
      f"# {name}: LOST vs baselines at a matched parameter budget\n",
      f"Command (from the repository root):\n\n```\n{command}\n```\n",
      common.setup_line(first, rows[0]["eval_tokens"]) + "\n",
      "Learning rates and Adam b2 are each method's preset (configs.pretrain_config: the "
      "low-rank family at the size's peak lr, full-rank and GaLore capped at 1e-3; LOST b2 "
      "0.95) unless set per method: "
      + ("; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in kv.items())
                   for m, kv in (method_overrides or {}).items()) or "none") + ".\n",
      f"Measured on {common.environment()}.\n",
      common.markdown_table(header, table) + "\n",
      ranking_text(rows) + " Single seed: no seed-to-seed spread was measured, so small gaps "
      "are not established differences.\n",
      f"![validation perplexity vs step]({name}.png)\n",
      "Columns: trainable parameters include the embedding, norms and LM head "
      "(accounting.count_params); \"projections\" are the q/k/v/o/gate/up/down layers, where "
      "the methods differ. Baseline ranks match LOST's projection parameters "
      "(configs.matched_rank); GaLore is a dense model with a rank-projected optimizer whose "
      "block-kernel updates are multiplied by galore_scale (effective lr = lr x scale). "
      "tokens/s is the median of the logged windows (the first window of a run includes "
      "compilation); on a shared CPU it also reflects other load. Step memory \"XLA\" is "
      "memory_analysis of the compiled train step on this host: arguments (parameters, "
      "optimizer state, static indices, batch) + temporaries + outputs - donated aliases; "
      "\"estimate\" is accounting.memory_estimate (weights + gradients + optimizer + "
      "activations).\n",
  ]
  return "\n".join(parts)


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  size = common.size_from_config(f["config"], "methods")
  common.check_names(f.methods, configs.METHODS, "methods")
  rows = run(size, f.methods, name=f.name, workdir_root=f.workdir_root,
             overrides=config_flags.get_override_values(f["config"]),
             method_overrides=common.parse_method_overrides(f.per_method, f.methods),
             out_dir=f.out_dir, command=common.command_line(), quiet=f.quiet,
             measure_memory=f.memory)
  print(ranking_text(rows))


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("methods", list(configs.METHODS), "Methods to train (configs.METHODS).")
  flags.DEFINE_multi_string("per_method", [], "method:key=value, a field for one method only "
                            "(applied last), e.g. galore:train.lr=4e-3. Repeatable.")
  flags.DEFINE_bool("memory", True, "Also compile each step for XLA's memory analysis.")
  return common.define_run_flags("method")


if __name__ == "__main__":
  common.run_main(define_flags, _main)
