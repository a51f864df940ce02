"""Shared fixtures; the builders they use live in helpers.py.

The suite runs under the XLA:CPU defaults the command line sets (lost_jax.training.xla_setup)
plus flags that make XLA compile its tiny programs faster (helpers.FAST_COMPILE_FLAGS; every
subprocess a test starts inherits them). The pinned quickstart losses, measured through the
command line, are checked in a subprocess under the command line's flags alone
(test_pinned_loss.py).
"""

import importlib.util
import os
import shutil
import tempfile

# One persistent compilation cache for the session: every xdist worker and every subprocess a
# test starts (they inherit the environment) reuses what another compiled; the executables are
# the same, so results are too. Set before jax is imported (it reads these at import). A fresh
# directory per session, made by the first process (the xdist controller) and removed by it at
# the end; a user's own JAX_COMPILATION_CACHE_DIR wins. A size limit turns on jax's file lock
# around each entry's read and write (no process reads an entry another is writing); with it
# every write scans the cache, so only compiles of 0.5 s or more (steps, not single ops) are
# kept. A process SIGKILLed mid-write could leave an entry torn (a later read warns and
# compiles again): a test that SIGKILLs gives its processes their own (test_multiprocess.py).
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MADE_CACHE = None
if _CACHE_ENV not in os.environ and importlib.util.find_spec("filelock") is not None:
  _MADE_CACHE = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="lost_jax_tests_jax_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))

import pytest  # pylint: disable=wrong-import-position

import helpers  # pylint: disable=wrong-import-position
from lost_jax.training import xla_setup  # pylint: disable=wrong-import-position

# The suite's fast-compile flags (helpers.FAST_COMPILE_FLAGS), then the command line's defaults.
if os.environ.get("LOST_JAX_TEST_FAST_COMPILE", "1") != "0":
  os.environ["XLA_FLAGS"] = xla_setup.with_defaults(os.environ.get("XLA_FLAGS", ""),
                                                    helpers.FAST_COMPILE_FLAGS)
xla_setup.configure()   # before any test starts a JAX backend


def pytest_unconfigure(config):
  del config
  if _MADE_CACHE is not None:
    shutil.rmtree(_MADE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def pretrained_workdir(tmp_path_factory) -> str:
  """A finished run of helpers.base_pretrain_config(), trained once per test session.

  Read it only: a test that writes to a run copies it first (`pretrained_copy`).
  """
  from lost_jax.recipes import pretrain  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("pretrained") / "run")
  pretrain.train_and_evaluate(helpers.base_pretrain_config(), workdir, quiet=True)
  return workdir


@pytest.fixture
def pretrained_copy(pretrained_workdir, tmp_path) -> str:
  """A private copy of the session's pre-trained run, for a test that resumes or changes it."""
  return shutil.copytree(pretrained_workdir, str(tmp_path / "pretrained"))
