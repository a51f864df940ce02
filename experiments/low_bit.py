"""8-bit optimizer states and a 4-bit (NF4) frozen base against full precision, on a CPU model.

  python -m experiments.low_bit --config=configs/pretrain.py:quickstart --name=cpu_d256_l4_low_bit \
      [--config.model.d_model=256 ...]

1. Pre-training: full-rank and LOST, each with 32-bit AdamW and with 8-bit AdamW states
   (train.optimizer=adamw8bit), same data, steps and seed. Reports the final validation loss
   and the largest gap between the 8-bit and 32-bit training-loss curves.
2. Fine-tuning: the finished full-rank (32-bit) run is the base of a SparseLoRA fine-tune of
   the built-in arithmetic task (configs.finetune_config('quickstart')), once with the base as
   trained and once with its block projections in NF4 (init.quantize=nf4).
Every run is cached by its full config and the code version (experiments/runs.py): it trains
in `<workdir_root>/<name>/<key>` (fine-tunes: `finetune_<key>`), an interrupted run resumes
there, and a finished one is reused only by the same config under the same code. Writes
`<out_dir>/<name>.md`, `.png` (training loss vs step) and `.json`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from experiments import common, runs
from lost_jax import configs
from lost_jax.recipes import finetune
from lost_jax.training import metrics

# run -> (method preset, train.optimizer)
PRETRAIN = {"full_rank": ("full_rank", "adamw"), "full_rank 8-bit": ("full_rank", "adamw8bit"),
            "lost": ("lost", "adamw"), "lost 8-bit": ("lost", "adamw8bit")}
FINETUNE = ("base as trained", "base NF4")
# Tolerances the runs are judged by (stated before running; single seed).
EVAL_LOSS_TOL = 0.02        # |8-bit - 32-bit| final validation loss, relative
CURVE_TOL = 0.05            # largest |8-bit - 32-bit| logged training loss, relative
FINETUNE_TOL = 0.02         # |NF4 - unquantised base| final fine-tune eval loss, relative


def train_losses(workdir: str) -> dict[int, float]:
  """Logged training loss by step (the last value of a repeated step after a resume)."""
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def curve_gap(a: dict[int, float], b: dict[int, float]) -> float:
  """max over common steps of |a - b| / b."""
  return max(abs(a[s] - b[s]) / b[s] for s in sorted(set(a) & set(b)))


def pretrain_configs(size: str, overrides: dict[str, Any]) -> dict[str, ml_collections.ConfigDict]:
  """Run name -> the `<size>,<method>` config with `overrides` and the run's optimizer."""
  out = {}
  for run_name, (method, optimizer) in PRETRAIN.items():
    cfg = common.method_config(size, method, {**overrides, "train.optimizer": optimizer})
    cfg.name = f"{size},{method},{optimizer}"
    out[run_name] = cfg
  return out


def pretrain(cfg: ml_collections.ConfigDict, workdir_root: str, quiet: bool = True) -> dict:
  """runs.run (cached by config + code) with the training-loss curve and the workdir added."""
  result = runs.run(cfg, workdir_root, quiet=quiet)
  return dict(result, workdir=os.path.join(workdir_root, result["key"]),
              losses={int(s): v for s, v in result["loss_curve"]})


def finetune_config(base_workdir: str, quantize: str,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The quickstart SparseLoRA fine-tune of `base_workdir` with `init.quantize` = quantize."""
  cfg = configs.finetune_config("quickstart")
  cfg.init.path, cfg.init.quantize = base_workdir, quantize
  cfg.update_from_flattened_dict(overrides)
  return cfg


def finetune_run(cfg: ml_collections.ConfigDict, workdir_root: str, quiet: bool = True) -> dict:
  """Fine-tune `cfg` in `<workdir_root>/finetune_<key>`, or return its stored result.

  Cached like runs.run: key = runs.result_key of the full config (init.path is the base's
  workdir, itself keyed by its config and code) and the code version.
  """
  version = runs.code_version()
  key = runs.result_key(cfg, version)
  workdir = os.path.join(workdir_root, "finetune_" + key)
  stored = runs.load_result(workdir, cfg, version)
  if stored is not None:
    return stored
  out = finetune.finetune_and_evaluate(cfg, workdir, quiet=quiet)
  losses = train_losses(workdir)
  if out.get("step") != cfg.train.steps or "eval_loss" not in out:
    raise runs.Interrupted(f"fine-tune {cfg.init.quantize}: stopped before step "
                           f"{cfg.train.steps}; rerunning resumes from {workdir}")
  result = {k: float(out[k]) for k in ("eval_loss", "eval_accuracy") if k in out}
  result.update(key=key, workdir=workdir, losses=losses,
                config=runs.keyed_config(cfg),
                code_version=version)
  runs.write_json(os.path.join(workdir, key + ".json"), result)
  return result


def plot(curves: dict[str, dict], path: str, title: str) -> None:
  """Training loss vs step, one line per run."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11.0, 4.0))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2)
  for ax, group in zip(axes, ("pre-training", "fine-tuning")):
    for name, pts in curves[group].items():
      steps = sorted(int(s) for s in pts)
      ax.plot(steps, [pts[s] if s in pts else pts[str(s)] for s in steps],
              ls="--" if ("8-bit" in name or "NF4" in name) else "-", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(group)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run(size: str, *, name: str, workdir_root: str, overrides: dict[str, Any],
        finetune_overrides: dict[str, Any] | None = None,
        out_dir: str = "docs/results", command: str = "", quiet: bool = True,
        log: Callable[[str], None] = print) -> dict:
  """All pre-training and fine-tuning runs, then `<out_dir>/<name>.{md,png,json}`."""
  root = os.path.join(workdir_root, name)
  cfgs = pretrain_configs(size, overrides)
  pre = {}
  for run_name, cfg in cfgs.items():
    log(f"[{name}] {run_name} ({cfg.name}) under {root}")
    pre[run_name] = pretrain(cfg, root, quiet=quiet)
    log(f"[{name}] {run_name}: final validation loss {pre[run_name]['eval_loss']:.4f}")
  base = pre["full_rank"]["workdir"]
  ft = {}
  for run_name, quantize in zip(FINETUNE, ("none", "nf4")):
    log(f"[{name}] fine-tune, {run_name}")
    ft[run_name] = finetune_run(finetune_config(base, quantize, finetune_overrides or {}),
                                root, quiet=quiet)
    log(f"[{name}] fine-tune, {run_name}: eval loss {ft[run_name]['eval_loss']:.4f}")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  plot({"pre-training": {k: v["losses"] for k, v in pre.items()},
        "fine-tuning": {k: v["losses"] for k, v in ft.items()}}, path + ".png",
       title=f"{name}: 32-bit vs 8-bit AdamW states; SparseLoRA on an unquantised vs NF4 base")
  summary = {"code_version": runs.code_version(),
             "pretrain": {k: {f: v[f] for f in ("eval_loss", "eval_ppl", "losses", "key")}
                          for k, v in pre.items()},
             "finetune": {k: {f: v[f] for f in ("eval_loss", "eval_accuracy", "losses", "key")
                              if f in v} for k, v in ft.items()}}
  runs.write_json(path + ".json", summary)
  with open(path + ".md", "w") as f:
    f.write(report(summary, cfgs["full_rank"], name, command, pre["full_rank"]["eval_tokens"]))
  return summary


def setup_line(cfg: ml_collections.ConfigDict, eval_tokens: float) -> str:
  """The settings every pre-training run shares, in one paragraph."""
  m, d, t = cfg.model, cfg.data, cfg.train
  tokens = t.steps * t.batch_size * d.seq_len
  return (f"Model: LLaMA, d_model {m.d_model}, ffn {m.ffn_dim}, {m.n_layers} layers, "
          f"{m.n_heads} heads, vocab {m.vocab_size}, untied head. Data: `{d.source}` corpus, "
          f"seq_len {d.seq_len}, packing={d.packing}. Training: {t.steps} steps x "
          f"{t.batch_size} sequences x {d.seq_len} = {tokens:,} tokens, peak lr {t.lr:g}, "
          f"warmup {t.warmup_frac:.0%}, cosine to {t.min_lr_ratio:g} x peak, b1 {t.b1:g}, "
          f"b2 {t.b2:g}, clip {t.clip_norm:g}, weight decay {t.weight_decay:g}, precision "
          f"{t.precision}, seed {cfg.seed}. Validation: {int(eval_tokens):,} held-out tokens, "
          f"exact token-weighted perplexity, every {t.eval_every} steps and at the end.")


def report(s: dict, cfg: ml_collections.ConfigDict, name: str, command: str,
           eval_tokens: float) -> str:
  """The markdown document."""
  pre, ft = s["pretrain"], s["finetune"]
  rows, verdicts = [], []
  for method in ("full_rank", "lost"):
    a, b = pre[method + " 8-bit"], pre[method]
    rel = a["eval_loss"] / b["eval_loss"] - 1
    gap = curve_gap({int(k): v for k, v in a["losses"].items()},
                    {int(k): v for k, v in b["losses"].items()})
    ok = abs(rel) <= EVAL_LOSS_TOL and gap <= CURVE_TOL
    rows.append([method, f"{b['eval_loss']:.4f}", f"{a['eval_loss']:.4f}", f"{100 * rel:+.2f}%",
                 f"{100 * gap:.2f}%", "within" if ok else "**outside**"])
    verdicts.append(ok)
  a, b = ft["base NF4"], ft["base as trained"]
  rel = a["eval_loss"] / b["eval_loss"] - 1
  ft_ok = abs(rel) <= FINETUNE_TOL
  ft_row = [f"{b['eval_loss']:.4f}", f"{a['eval_loss']:.4f}", f"{100 * rel:+.2f}%",
            f"{b.get('eval_accuracy', float('nan')):.3f}",
            f"{a.get('eval_accuracy', float('nan')):.3f}", "within" if ft_ok else "**outside**"]
  parts = [
      f"# {name}: 8-bit optimizer states and a 4-bit frozen base vs full precision\n",
      common.page_head(command),
      setup_line(cfg, eval_tokens) + "\n",
      f"Measured on {common.environment()}.\n",
      "## 8-bit AdamW states (pre-training)\n",
      "`train.optimizer=adamw8bit`: Adam's moments stored block-wise (256 values per float32 "
      "scale) under the dynamic 8-bit map, mu directly and the second moment as sqrt(nu); "
      "moments under 4096 values stay float32. Same data order, steps and seed as the 32-bit "
      f"run. Tolerances, fixed before the runs: final validation loss within "
      f"{100 * EVAL_LOSS_TOL:g}% and every logged training loss within {100 * CURVE_TOL:g}% "
      "of the 32-bit run.\n",
      common.markdown_table(["method", "32-bit final val loss", "8-bit final val loss",
                             "8-bit vs 32-bit", "largest training-loss gap", "tolerance"],
                            rows) + "\n",
      "## 4-bit NF4 base (SparseLoRA fine-tune)\n",
      "Base: the full-rank 32-bit run above. Fine-tune: `configs.finetune_config('quickstart')`"
      " (SparseLoRA, LoRA on q,k,v,o, the built-in arithmetic task), once on the base as "
      "trained (float32) and once with `init.quantize=nf4`: every block projection stored as "
      "NF4 codes with a float32 scale per 64 values, dequantised on the fly; estimators are "
      "built from the dequantised kernels. Tolerance, fixed before the runs: final eval loss "
      f"within {100 * FINETUNE_TOL:g}%.\n",
      common.markdown_table(["unquantised-base eval loss", "NF4-base eval loss", "NF4 vs "
                             "unquantised", "unquantised exact match", "NF4 exact match",
                             "tolerance"], [ft_row]) + "\n",
      f"![training loss]({name}.png)\n",
      "Single seed: no seed-to-seed spread was measured.\n",
  ]
  return "\n".join(parts)


def _main(argv, flag_values):
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flag_values
  size, _, method = common.config_arg(f["config"]).partition(",")
  if method:
    raise app.UsageError(f"--config names a size only (got {method!r}); the methods are "
                         f"{sorted(PRETRAIN)}.")
  ft = {}
  if f.finetune_steps:
    ft = {"train.steps": f.finetune_steps, "train.eval_every": f.finetune_steps,
          "train.ckpt_every": f.finetune_steps}
  run(size.strip() or "quickstart", name=f.name, workdir_root=f.workdir_root,
      overrides=config_flags.get_override_values(f["config"]), finetune_overrides=ft,
      out_dir=f.out_dir, command=common.command_line(), quiet=f.quiet)


def define_flags():
  """Flags of this script (only when run as a program, so importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/pretrain.py:quickstart",
                                  "configs/pretrain.py:<size>; --config.* overrides apply to "
                                  "every pre-training run.", lock_config=True)
  flags.DEFINE_string("name", None, "Name of the experiment: docs file names and workdirs.")
  flags.DEFINE_string("workdir_root", "/tmp/lost_jax_runs", "Runs go to "
                      "<workdir_root>/<name>/<key>.")
  flags.DEFINE_string("out_dir", "docs/results", "Where <name>.md/.png/.json are written.")
  flags.DEFINE_bool("quiet", False, "No per-step progress lines.")
  flags.DEFINE_integer("finetune_steps", 0, "Fine-tuning steps; 0: the quickstart preset's.")
  flags.mark_flags_as_required(["name"])
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, _main)
