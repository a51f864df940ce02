"""The package's public names (every module imports, each `__all__` name exists) and its
command lines' --help."""

import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import lost_jax
from helpers import ROOT, subprocess_env
from lost_jax import usage


def test_every_module_imports_and_exports_only_names_it_defines():
  missing = []
  for info in pkgutil.walk_packages(lost_jax.__path__, "lost_jax."):
    module = importlib.import_module(info.name)
    names = getattr(module, "__all__", [])
    assert len(names) == len(set(names)), f"{info.name}: a name is listed twice in __all__"
    missing += [f"{info.name}.{name}" for name in names if not hasattr(module, name)]
  assert not missing, f"__all__ names that do not exist: {missing}"


def _command_lines() -> list[str]:
  """Every module run as `python -m ...`: the CLI, accounting, the experiments with a main."""
  names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                 if f.endswith(".py") and "\nif __name__ == \"__main__\"" in open(
                     os.path.join(ROOT, "experiments", f)).read())
  return ["lost_jax.main", "lost_jax.training.accounting"] + [f"experiments.{n}" for n in names]


def test_help_prints_the_usage_and_exits_0(capsys):
  for asked in ("--help", "-h", "--helpfull"):
    with pytest.raises(SystemExit) as e:
      usage.exit_on_help(["prog", "--config.train.steps=3", asked])
    assert e.value.code == 0 and capsys.readouterr().out.strip()
  usage.exit_on_help(["prog", "--workdir=/tmp/help"])     # no help asked: returns


@pytest.mark.slow
def test_every_command_line_answers_help_with_status_0():
  modules = _command_lines()
  assert "experiments.accelerator_check" in modules and len(modules) > 10
  procs = {m: subprocess.Popen([sys.executable, "-m", m, "-h"], cwd=ROOT, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for m in modules}
  failed = {}
  for m, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or not ("flags:" in out or "usage:" in out):
      failed[m] = (proc.returncode, err[-300:])
  assert not failed, failed
