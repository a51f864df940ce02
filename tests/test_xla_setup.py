"""lost_jax.xla_setup: CPU defaults appended to XLA_FLAGS without overriding the user's."""

import os
import subprocess
import sys

import pytest

from lost_jax.training import xla_setup

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_appended_once_and_user_settings_win():
  assert xla_setup.with_defaults("") == f"{FLAG}=-reduce"
  assert xla_setup.with_defaults("--a=1") == f"--a=1 {FLAG}=-reduce"
  assert xla_setup.with_defaults(f"{FLAG}=") == f"{FLAG}="      # user turned YNNPACK off
  twice = xla_setup.with_defaults(xla_setup.with_defaults("--a=1"))
  assert twice.split().count(f"{FLAG}=-reduce") == 1


@pytest.mark.slow
def test_configure_respects_opt_out_and_sets_the_environment():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         xla_setup.OPT_OUT: "0"}
  assert not xla_setup.configure(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  # In a fresh interpreter (no JAX backend yet) the flag is set and XLA accepts it.
  code = ("import os; from lost_jax.training import xla_setup; assert xla_setup.configure();"
          "import jax, jax.numpy as jnp; print(os.environ['XLA_FLAGS']);"
          "print(float(jnp.sum(jnp.ones((64, 64)) @ jnp.ones((64, 3)))));"
          "assert not xla_setup.configure()")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_setup.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = out.stdout.split()
  assert f"{FLAG}=-reduce" in lines and "12288.0" in lines
