"""LOST's ablations: factor init, sparse-part init, gamma, activation, element-wise sparsity.

  python experiments/ablate_lost.py --config=configs/pretrain.py:quickstart --name=my_ablation \
      [--ablations=lost,gamma=0.5,...] [--config.train.steps=100 ...]

Every variant is the `<size>,lost` preset (or `<size>,sltrain` for the element-wise row) with
the `--config.*` overrides re-applied, then the variant's own fields (ABLATIONS). The
SLTrain row's rank matches LOST's projection parameters (experiments.common.method_config).
Runs go to `<workdir_root>/<name>/<variant>` (resumable; finished variants are skipped);
writes `<out_dir>/<name>.md`, `.png` (validation perplexity vs step) and `.json`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # run as a file: make the repo root (`experiments`) importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import common  # pylint: disable=wrong-import-position
from lost_jax import train  # pylint: disable=wrong-import-position

# variant -> (method preset, fields set on it, what the row tests). "lost" is the reference.
ABLATIONS: dict[str, tuple[str, dict[str, Any], str]] = {
    "lost": ("lost", {}, "LOST as specified: SVD factors, S from the SVD complement, "
             "gamma 0.7, SiLU"),
    "factor_init=random": ("lost", {"model.linear.factor_init": "random"},
                           "random factors of the same shapes (CoLA's scale) instead of "
                           "the top-r SVD; S unchanged"),
    "sparse_init=weight": ("lost", {"model.linear.sparse_init": "weight"},
                           "S = rows of the full initial weight (the port's reading)"),
    "sparse_init=random_channels": ("lost", {"model.linear.sparse_init": "random_channels"},
                                    "channels drawn at random, S = rows of the initial weight"),
    "init=normal": ("lost", {"model.linear.init": "normal"},
                    "the decomposed full-rank weight drawn N(0, init_std) (LLaMA's init, the "
                    "port's) instead of kaiming U(+-1/sqrt(n))"),
    "gamma=0.3": ("lost", {"model.linear.gamma": 0.3}, "mixing weight of the low-rank branch"),
    "gamma=0.5": ("lost", {"model.linear.gamma": 0.5}, "mixing weight of the low-rank branch"),
    "gamma=0.9": ("lost", {"model.linear.gamma": 0.9}, "mixing weight of the low-rank branch"),
    "activation=identity": ("lost", {"model.linear.activation": "identity"},
                            "no SiLU between the factors"),
    "b2=0.999": ("lost", {"train.b2": 0.999}, "Adam b2 of the baselines' presets instead of "
                 "LOST's 0.95 (an optimizer control, not a layer ablation)"),
    "sltrain": ("sltrain", {}, "SLTrain: element-wise random sparse support + low-rank, "
                "matched parameters, its own defaults (identity, alpha/r scaling)"),
}
REFERENCE = "lost"


def variant_config(size: str, variant: str,
                   overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The run config of one ablation variant (validated)."""
  if variant not in ABLATIONS:
    raise ValueError(f"unknown ablation {variant!r}. Fix: use one of {tuple(ABLATIONS)}.")
  method, fields, _ = ABLATIONS[variant]
  cfg = common.method_config(size, method, overrides)
  cfg.update_from_flattened_dict(fields)
  cfg.name = f"{size},{variant}"
  check = ml_collections.ConfigDict(cfg.to_dict())
  train.apply_precision(check)
  train.validate(check)
  return cfg


def run(size: str, variants: Iterable[str], *, name: str, workdir_root: str,
        overrides: dict[str, Any] | None = None, out_dir: str = "docs/results",
        command: str = "", quiet: bool = True,
        log: Callable[[str], None] = print) -> list[dict]:
  """Train (or reuse) every variant, then write `<out_dir>/<name>.{md,png,json}`."""
  cfgs = {v: variant_config(size, v, overrides) for v in variants}
  rows = []
  for variant, cfg in cfgs.items():
    workdir = os.path.join(workdir_root, name, variant.replace("=", "_"))
    log(f"[{name}] {variant} -> {workdir}")
    result = common.run(cfg, workdir, quiet=quiet)
    rows.append(dict(variant=variant, config=cfg.to_dict(), **result))
    log(f"[{name}] {variant}: final validation perplexity {result['eval_ppl']:.2f}")
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, name)
  common.plot_eval_ppl({r["variant"]: r["workdir"] for r in rows}, base + ".png",
                       title=f"{name}: validation perplexity")
  with open(base + ".md", "w") as f:
    f.write(report(rows, cfgs, name, command))
  with open(base + ".json", "w") as f:
    json.dump([{k: v for k, v in r.items() if k != "workdir"} for r in rows], f, indent=1)
  return rows


def report(rows: list[dict], cfgs: dict[str, ml_collections.ConfigDict], name: str,
           command: str) -> str:
  """The markdown document of an ablation."""
  ref = next((r["eval_ppl"] for r in rows if r["variant"] == REFERENCE), None)
  table = []
  for r in rows:
    lin = cfgs[r["variant"]].model.linear
    delta = f"{100 * (r['eval_ppl'] / ref - 1):+.1f}%" if ref else "-"
    table.append([r["variant"], ABLATIONS[r["variant"]][2], f"{lin.kind} r={lin.rank}",
                  f"{r['params']['projections'] / 1e6:.3f}", f"{r['eval_loss']:.4f}",
                  f"**{r['eval_ppl']:.2f}**", delta, f"{r['tokens_per_s']:,.0f}"])
  header = ["variant", "what changes", "layer", "projection params (M)", "final val loss",
            "final val ppl", "vs LOST", "train tokens/s (median)"]
  first = next(iter(cfgs.values()))
  t = first.train
  text = common.ranking_text([(r["variant"], r["eval_ppl"]) for r in rows],
                             reference=REFERENCE, reference_label="LOST as specified")
  parts = [
      f"# {name}: LOST ablations\n",
      f"Command (from the repository root):\n\n```\n{command}\n```\n",
      common.setup_line(first, rows[0]["eval_tokens"]) + "\n",
      f"Every row uses the LOST optimizer settings (adamw, lr {t.lr:g}, b1 {t.b1:g}, "
      f"b2 {t.b2:g}) and LOST's rank {first.model.linear.rank}, except where the row says "
      "otherwise (the SLTrain row uses its preset, b2 0.999, at the matched rank).\n",
      f"Measured on {common.environment()}.\n",
      common.markdown_table(header, table) + "\n",
      text + " Single seed: no seed-to-seed spread was measured, so small gaps are not "
      "established differences.\n",
      f"![validation perplexity vs step]({name}.png)\n",
  ]
  return "\n".join(parts)


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  size = common.size_from_config(f["config"], "ablations")
  common.check_names(f.ablations, ABLATIONS, "ablations")
  rows = run(size, f.ablations, name=f.name, workdir_root=f.workdir_root,
             overrides=config_flags.get_override_values(f["config"]), out_dir=f.out_dir,
             command=common.command_line(), quiet=f.quiet)
  print(common.ranking_text([(r["variant"], r["eval_ppl"]) for r in rows], REFERENCE))


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("ablations", list(ABLATIONS), "Variants to run (ABLATIONS).")
  return common.define_run_flags("variant")


if __name__ == "__main__":
  common.run_main(define_flags, _main)
