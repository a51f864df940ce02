"""Helpers shared by the experiment scripts: per-method configs, command lines, reports."""

from __future__ import annotations

import functools
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from typing import Any, Callable, Iterable

import jax
import ml_collections

from lost_jax import configs, usage
from lost_jax.training import xla_setup

# Baselines whose rank is re-derived so their projection parameters match LOST's.
MATCHED_KINDS = ("low_rank", "cola", "sltrain")


def config_arg(config_flag) -> str:
  """The text after ':' of a `--config=file.py:<arg>` flag (ml_collections config flag)."""
  return config_flag.config_filename.partition(":")[2]


def check_names(names: Iterable[str], allowed: Iterable[str], what: str) -> None:
  """UsageError naming every entry of `names` that is not in `allowed`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  allowed = tuple(allowed)
  bad = [n for n in names if n not in allowed]
  if bad:
    raise app.UsageError(f"unknown {what} {bad}; choose from {allowed}")


# absl's parsing with --help / -h / --helpfull printing the usage and exiting 0 (absl: 1).
parse_flags = usage.parse_flags


def run_main(define_flags: Callable[[], Any], main: Callable[[list, Any], None]) -> None:
  """`if __name__ == "__main__"` of an experiment: XLA defaults, flags, quiet logs, app.run."""
  xla_setup.configure()   # before the first JAX computation
  code_version_line()     # the code this run starts on, before anything can edit it
  from absl import app, logging  # pylint: disable=g-import-not-at-top
  flag_values = define_flags()
  logging.set_verbosity(logging.WARNING)  # orbax / grain log every save at INFO
  app.run(lambda argv: _main_or_interrupted(main, argv, flag_values),
          flags_parser=usage.parse_flags)


def _main_or_interrupted(main, argv, flag_values):
  """main(); a run stopped by SIGTERM/SIGINT (checkpoint saved) ends with one line, status 143."""
  from experiments import runs  # pylint: disable=g-import-not-at-top
  try:
    return main(argv, flag_values)
  except runs.Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    return 143


def method_config(size: str, method: str,
                  overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The `<size>,<method>` preset with `overrides` (typed, flat).

  `model.linear.rank` is LOST's rank: low_rank / cola / sltrain get the rank whose projection
  parameters match LOST's on the final (overridden) model shape (configs.matched_rank), and
  GaLore's projection rank is LOST's unless `train.galore_rank` is overridden.
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
  return cfg


def drop_checkpoints(workdir_root: str, key: str) -> None:
  """Delete the checkpoints of a finished run (its result and metrics stay): a sweep of many
  runs would otherwise keep two full training states per run."""
  shutil.rmtree(os.path.join(workdir_root, key, "checkpoints"), ignore_errors=True)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The README quotes a generated page's tables between these two lines (`<!-- table 2 of
# docs/results/x.md -->` ... `<!-- end of quote -->`); the page's writer refreshes them
# (quote_tables) and tests/test_pages.py checks each is the page's own.
README_QUOTE = re.compile(
    r"<!-- table (\d+) of (\S+) -->\n(.*?)<!-- end of quote -->", re.S)


def tables(text: str) -> list[str]:
  """The markdown tables of `text` in order (each its consecutive '|' lines,
  newline-terminated)."""
  out, current = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      current.append(line + "\n")
    elif current:
      out.append("".join(current))
      current = []
  return out


def quote_tables(page_path: str, page_text: str, readme: str = "") -> int:
  """Replace the README's quotes of `page_path`'s tables (repository-relative path) with
  those of `page_text`; the number of quotes replaced (0: the README quotes no table of it,
  or a table it names is not on the page, and is then left as it is)."""
  readme = readme or os.path.join(REPO, "README.md")
  with open(readme, encoding="utf-8") as f:
    text = f.read()
  found = tables(page_text)
  quotes = [m for m in README_QUOTE.finditer(text)
            if m.group(2) == page_path and 1 <= int(m.group(1)) <= len(found)]
  for m in reversed(quotes):
    text = text[:m.start(3)] + found[int(m.group(1)) - 1] + text[m.end(3):]
  if quotes:
    with open(readme, "w", encoding="utf-8") as f:
      f.write(text)
  return len(quotes)


def command_line(argv: list[str] | None = None) -> str:
  """The shell command that reproduces this invocation from the repository root:
  `python -m experiments.NAME ARGS` (the way the scripts run), argv[0] replaced."""
  argv = list(sys.argv if argv is None else argv)
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name.startswith("experiments."):
    prog = ["-m", spec.name]
  else:   # run as a file, or imported by a test: name the module the file is
    rel = os.path.relpath(os.path.abspath(argv[0]), REPO) if argv else ""
    prog = (["-m", rel[:-3].replace(os.sep, ".")]
            if rel.startswith("experiments" + os.sep) and rel.endswith(".py") else [argv[0]])
  return " ".join(["python"] + prog + [shlex.quote(a) for a in argv[1:]])


def _git(*args: str) -> str:
  """`git ARGS` in the repository, stripped; '' without git or a checkout."""
  try:
    out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                         timeout=30, check=True)
  except (OSError, subprocess.SubprocessError):
    return ""
  return out.stdout.strip()


def last_commit(path: str) -> str:
  """The short hash of the last commit that changed `path` ('' outside a checkout)."""
  return _git("log", "-1", "--format=%h", "--", os.path.abspath(path))


@functools.lru_cache(maxsize=None)
def code_version_line() -> str:
  """'Code version: commit <sha>[ + uncommitted changes], lost_jax sources <hash>.': the line
  every generated page carries under its command (tests/test_pages.py requires it). Read once
  per process (run_main reads it at start), so a page names the code its run started on."""
  from experiments import runs  # pylint: disable=g-import-not-at-top
  commit = _git("rev-parse", "--short=10", "HEAD") or "unknown (no git checkout)"
  dirty = _git("status", "--porcelain", "--", "lost_jax", "experiments", "configs")
  line = (f"Code version: commit {commit}"
          + (" + uncommitted changes" if dirty else "")
          + f", lost_jax sources {runs.sources_hash()} (experiments/runs.sources_hash).")
  return line


def _sources_at(commits: list[str]) -> dict[str, str]:
  """commit -> runs.hash_sources of the files runs.source_files() names, read from git."""
  from experiments import runs  # pylint: disable=g-import-not-at-top
  paths = {c: sorted([p for p in _git("ls-tree", "-r", "--name-only", c, "--",
                                      "lost_jax").split() if p.endswith(".py")]
                     + ["experiments/runs.py"]) for c in commits}
  asked = [(c, p) for c in commits for p in paths[c]]
  blobs = subprocess.run(["git", "-C", REPO, "cat-file", "--batch"], check=True,
                         input="".join(f"{c}:{p}\n" for c, p in asked).encode(),
                         capture_output=True, timeout=600).stdout
  files = {c: [] for c in commits}
  pos = 0
  for c, p in asked:   # each answer: "<sha> blob <size>\n<bytes>\n", or "<name> missing\n"
    end = blobs.index(b"\n", pos)
    head = blobs[pos:end].split()
    if head[-1] == b"missing":
      pos = end + 1
      continue
    size = int(head[2])
    files[c].append((p, blobs[end + 1:end + 1 + size]))
    pos = end + 2 + size
  return {c: runs.hash_sources(files[c]) for c in commits}


@functools.lru_cache(maxsize=None)
def _source_history() -> tuple[list[str], dict[str, str]]:
  """(the commits that changed the hashed sources, oldest first; commit -> sources hash)."""
  commits = _git("rev-list", "--reverse", "HEAD", "--", "lost_jax",
                 "experiments/runs.py").split()
  return commits, _sources_at(commits)


def sources_version_line(sources: str) -> str:
  """The 'Code version: commit ...' line of results made by lost_jax sources hash `sources`
  (runs.sources_hash), found in this checkout's history: the first commit with those
  sources and how many later ones changed them."""
  commits, hashes = _source_history()
  found = [i for i, c in enumerate(commits) if hashes[c] == sources]
  if not found:
    return (f"Code version: unknown (no commit of this checkout's history has lost_jax "
            f"sources {sources}, the hash these results recorded).")
  first = _git("rev-parse", "--short=10", commits[found[0]])
  later = len(commits) - found[-1] - 1
  return (f"Code version: commit {first} (lost_jax sources {sources}, the hash every result "
          "below recorded" + (f"; {later} later commit(s) changed lost_jax/ or "
                              "experiments/runs.py, none re-run here)." if later else ")."))


def results_version(sources_hash: str, report_only: bool) -> tuple[dict, str | None]:
  """(the code version whose stored results a command reads, the page-head line naming it;
  None: this checkout's). `sources_hash` (a --sources_hash flag) selects older code's results
  and is refused in one line (exit 2) unless the command only reports."""
  from experiments import runs  # pylint: disable=g-import-not-at-top
  if not sources_hash:
    return runs.code_version(), None
  if not report_only:
    print("error: --sources_hash only reports; a run is never resumed or reused under "
          "other code. Fix: add --report_only, or drop --sources_hash.", file=sys.stderr)
    sys.exit(2)
  return dict(runs.code_version(), sources=sources_hash), sources_version_line(sources_hash)


def page_head(command: str, version_line: str | None = None) -> str:
  """The lines under a generated page's title: the command that wrote it (from the repository
  root) and the code version its numbers were made on (`version_line`, recorded when they
  were measured; default: this checkout's code_version_line())."""
  return (f"Command (from the repository root):\n\n```\n{command}\n```\n\n"
          f"{version_line or code_version_line()}\n")


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


def mean_spread(values: list[float]) -> dict:
  """n, mean, sample standard deviation (0 for one value), min and max."""
  return dict(n=len(values), mean=statistics.fmean(values),
              std=statistics.stdev(values) if len(values) > 1 else 0.0,
              min=min(values), max=max(values))


def band(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
  """(step, mean, min, max) at every step present in all `curves` ((step, value) lists)."""
  common_steps = set.intersection(*(set(s for s, _ in c) for c in curves))
  by_step = [dict(c) for c in curves]
  return [(s, statistics.fmean(d[s] for d in by_step), min(d[s] for d in by_step),
           max(d[s] for d in by_step)) for s in sorted(common_steps)]


def plot_bands(series: dict[str, list[list[tuple[int, float]]]], path: str, title: str,
               xlabel: str = "step", ylabel: str = "validation perplexity",
               log_x: bool = False) -> None:
  """One line per name: the mean over its curves, shaded between their min and max (log y)."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(8.0, 4.2))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for i, (name, curves) in enumerate(series.items()):
    pts = band(curves) if curves else []
    if not pts:
      continue
    x, mean, lo, hi = zip(*pts)
    line, = ax.plot(x, mean, marker="o", ms=3, ls="-" if i < 10 else "--",
                    label=f"{name} (n={len(curves)})")
    if len(curves) > 1:
      ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_yscale("log")
  if log_x:
    ax.set_xscale("log", base=2)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")   # keeps a title wider than the axes
