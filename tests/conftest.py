"""Shared fixtures; the builders they use live in helpers.py.

The suite runs under the XLA:CPU defaults the command line sets (lost_jax.training.xla_setup),
so an in-process run computes what `python -m lost_jax.main` computes: the pinned quickstart
losses in test_pinned_loss.py were measured through the command line.
"""

import shutil

import pytest

import helpers
from lost_jax.training import xla_setup

xla_setup.configure()   # before any test starts a JAX backend


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
