"""Helpers shared by the experiment scripts: per-method configs, resumable runs, reports."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections

from lost_jax import accounting, configs, metrics, train, xla_setup

# Baselines whose rank is re-derived so their projection parameters match LOST's.
MATCHED_KINDS = ("low_rank", "cola", "sltrain")
RESULT_FILE = "result.json"      # written once a run has finished and been evaluated
REQUEST_FILE = "experiment.json"  # the config a workdir was started with


def config_arg(config_flag) -> str:
  """The text after ':' of a `--config=file.py:<arg>` flag (ml_collections config flag)."""
  return config_flag.config_filename.partition(":")[2]


def size_from_config(config_flag, what: str) -> str:
  """The size of `--config=configs/pretrain.py:<size>` (default quickstart); a method there is
  a usage error, since `--<what>` lists what runs."""
  from absl import app  # pylint: disable=g-import-not-at-top
  size, _, method = config_arg(config_flag).partition(",")
  if method:
    raise app.UsageError(f"--config names a size only (got {method!r}); the {what} come "
                         f"from --{what}.")
  return size.strip() or "quickstart"


def check_names(names: Iterable[str], allowed: Iterable[str], what: str) -> None:
  """UsageError naming every entry of `names` that is not in `allowed`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  allowed = tuple(allowed)
  bad = [n for n in names if n not in allowed]
  if bad:
    raise app.UsageError(f"unknown {what} {bad}; choose from {allowed}")


def define_run_flags(what: str):
  """Flags shared by the training experiments (--config, --name, --workdir_root, --out_dir,
  --quiet); `what` names one run ("method", "variant")."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/pretrain.py:quickstart",
                                  "configs/pretrain.py:<size>; --config.* overrides apply "
                                  f"to every {what}.", lock_config=True)
  flags.DEFINE_string("name", None, "Name of the experiment: docs file names and workdirs.")
  flags.DEFINE_string("workdir_root", "/tmp/lost_jax_runs", "Runs go to "
                      f"<workdir_root>/<name>/<{what}>.")
  flags.DEFINE_string("out_dir", "docs/results", "Where <name>.md/.png/.json are written.")
  flags.DEFINE_bool("quiet", False, "No per-step progress lines.")
  flags.mark_flags_as_required(["name"])
  return flags.FLAGS


def run_main(define_flags: Callable[[], Any], main: Callable[[list, Any], None]) -> None:
  """`if __name__ == "__main__"` of an experiment: XLA defaults, flags, quiet logs, app.run."""
  xla_setup.configure()   # before the first JAX computation
  from absl import app, logging  # pylint: disable=g-import-not-at-top
  flag_values = define_flags()
  logging.set_verbosity(logging.WARNING)  # orbax / grain log every save at INFO
  app.run(lambda argv: main(argv, flag_values))


def parse_value(old: Any, text: str) -> Any:
  """`text` converted to the type of the config field it replaces (`old`)."""
  if isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a boolean. Fix: write true or false.")
    return text.lower() in ("true", "1")
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  return text


def parse_method_overrides(specs: Iterable[str],
                           methods: Iterable[str]) -> dict[str, dict[str, str]]:
  """['galore:train.lr=4e-3', ...] -> {'galore': {'train.lr': '4e-3'}} (values still text)."""
  methods = tuple(methods)
  out: dict[str, dict[str, str]] = {}
  for spec in specs:
    head, eq, value = spec.partition("=")
    method, colon, key = head.partition(":")
    if not (eq and colon and key):
      raise ValueError(f"{spec!r} is not 'method:key=value'. Fix: e.g. galore:train.lr=4e-3.")
    if method not in methods:
      raise ValueError(f"{spec!r} names method {method!r}, which is not run. Fix: use one "
                       f"of {methods}.")
    out.setdefault(method, {})[key] = value
  return out


def _set_text(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
  *groups, field = key.split(".")
  node = cfg
  for g in groups:
    node = node[g]
  if field not in node:
    raise ValueError(f"config has no field {key!r}. Fix: check the name in "
                     "lost_jax/configs.py.")
  node[field] = parse_value(node[field], text)


def method_config(size: str, method: str, overrides: dict[str, Any] | None = None,
                  method_overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
  """The `<size>,<method>` preset with `overrides` (typed, flat) then `method_overrides` (text).

  `model.linear.rank` is LOST's rank: low_rank / cola / sltrain get the rank whose projection
  parameters match LOST's on the final (overridden) model shape (configs.matched_rank), and
  GaLore's projection rank is LOST's unless `train.galore_rank` is overridden. A per-method
  override is applied last and wins over both rules.
  """
  overrides = dict(overrides or {})
  lost = configs.pretrain_config(size, "lost")
  lost.update_from_flattened_dict(overrides)
  cfg = configs.pretrain_config(size, method)
  cfg.update_from_flattened_dict(overrides)
  lin = cfg.model.linear
  if lin.kind in MATCHED_KINDS:
    lin.rank = configs.matched_rank(cfg.model, lin.kind, lost.model.linear.rank,
                                    lost.model.linear.sparsity, lin.density)
  if cfg.train.optimizer.startswith("galore") and "train.galore_rank" not in overrides:
    cfg.train.galore_rank = lost.model.linear.rank
  for key, text in (method_overrides or {}).items():
    _set_text(cfg, key, text)
  return cfg


def _jsonable(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)   # a crash never leaves a half-written result behind


def latest_rows(workdir: str) -> list[dict]:
  """metrics.jsonl rows, keeping the last row per (step, kind) after a resumed run repeats one."""
  by_key = {}
  for row in metrics.read_metrics(workdir):
    by_key[(row["step"], "eval_ppl" in row)] = row
  return [by_key[k] for k in sorted(by_key)]


def summarize(rows: list[dict], steps: int) -> dict:
  """Final eval metrics (the eval at `steps`) and the median logged training throughput."""
  final = [r for r in rows if "eval_ppl" in r and r["step"] == steps]
  if not final:
    raise RuntimeError(f"no evaluation at the final step {steps} in metrics.jsonl")
  speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
  out = {k: final[-1][k] for k in ("eval_loss", "eval_ppl", "eval_tokens")}
  # Median: the first logged window of each invocation also contains compilation.
  out["tokens_per_s"] = statistics.median(speeds) if speeds else float("nan")
  return out


def run(cfg: ml_collections.ConfigDict, workdir: str, *, quiet: bool = True,
        measure: Callable[[ml_collections.ConfigDict], dict] | None = None) -> dict:
  """Train + evaluate `cfg` in `workdir`, or return the stored result of a finished run.

  Resumable: an interrupted run continues from its last checkpoint. A workdir started with a
  different config is refused rather than mixed. `measure(cfg)` adds fields (e.g. memory) to
  the stored result.
  """
  os.makedirs(workdir, exist_ok=True)
  want = _jsonable(cfg)
  request = os.path.join(workdir, REQUEST_FILE)
  if os.path.exists(request):
    with open(request) as f:
      if json.load(f) != want:
        raise ValueError(f"{workdir} was started with a different config. Fix: choose another "
                         f"--workdir_root or --name, or delete {workdir}.")
  else:
    _write_json(request, want)
  result_path = os.path.join(workdir, RESULT_FILE)
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  t0 = time.time()
  train.train_and_evaluate(cfg, workdir, quiet=quiet)
  result = dict(name=cfg.name, workdir=workdir, steps=cfg.train.steps,
                params=accounting.count_params(cfg.model), wall_s=time.time() - t0,
                **summarize(latest_rows(workdir), cfg.train.steps))
  if measure is not None:
    result.update(measure(cfg))
  _write_json(result_path, result)
  return result


def command_line(argv: list[str] | None = None) -> str:
  """The shell command that reproduces this invocation."""
  argv = list(sys.argv if argv is None else argv)
  return " ".join(["python"] + [shlex.quote(a) for a in argv])


def environment() -> str:
  """One line naming the software and hardware a result was measured on."""
  dev = jax.devices()[0]
  flags = os.environ.get("XLA_FLAGS", "").strip()
  return (f"jax {jax.__version__}, {dev.platform} ({dev.device_kind}), {os.cpu_count()} "
          f"host cores, Python {platform.python_version()}"
          + (f", XLA_FLAGS `{flags}`" if flags else ""))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """A GitHub markdown table; cells are str()-ed."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def ranking(names_values: list[tuple[str, float]]) -> list[tuple[str, float]]:
  """(name, value) pairs sorted best (lowest) first; stable for ties."""
  return sorted(names_values, key=lambda nv: nv[1])


def setup_line(cfg: ml_collections.ConfigDict, eval_tokens: float) -> str:
  """The settings every method shares, in one paragraph."""
  m, d, t = cfg.model, cfg.data, cfg.train
  tokens = t.steps * t.batch_size * d.seq_len
  return (f"Model: LLaMA, d_model {m.d_model}, ffn {m.ffn_dim}, {m.n_layers} layers, "
          f"{m.n_heads} heads, vocab {m.vocab_size}, untied head. Data: `{d.source}` corpus, "
          f"seq_len {d.seq_len}, packing={d.packing}. Training: {t.steps} steps x "
          f"{t.batch_size} sequences x {d.seq_len} = {tokens:,} tokens, warmup "
          f"{t.warmup_frac:.0%}, cosine to {t.min_lr_ratio:g} x peak, clip {t.clip_norm:g}, "
          f"weight decay {t.weight_decay:g}, precision {t.precision}, seed {cfg.seed}. "
          f"Validation: "
          f"{int(eval_tokens):,} held-out tokens, exact token-weighted perplexity, every "
          f"{t.eval_every} steps and at the end.")


def ranking_text(pairs: list[tuple[str, float]], reference: str | None = None,
                 reference_label: str | None = None) -> str:
  """'Ranking by final validation perplexity: 1. a (x), ...' and each run's gap to `reference`."""
  order = ranking(pairs)
  text = ("Ranking by final validation perplexity (lower is better): "
          + ", ".join(f"{i}. {n} ({v:.2f})" for i, (n, v) in enumerate(order, 1)) + ".")
  ref = dict(order).get(reference)
  if ref:
    text += f" Relative to {reference_label or reference}: " + ", ".join(
        f"{n} {100 * (v / ref - 1):+.1f}%" for n, v in order if n != reference) + "."
  return text


def plot_eval_ppl(workdirs: dict[str, str], path: str, title: str) -> None:
  """Validation perplexity vs step, one line per run (log scale), legend beside the axes."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(8.0, 4.2))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for i, (name, workdir) in enumerate(workdirs.items()):
    pts = [(r["step"], r["eval_ppl"]) for r in latest_rows(workdir) if "eval_ppl" in r]
    if pts:  # the default colour cycle has 10 colours: later runs get dashed lines
      ax.plot(*zip(*pts), marker="o", ms=3, label=name, ls="-" if i < 10 else "--")
  ax.set_xlabel("step")
  ax.set_ylabel("validation perplexity")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
