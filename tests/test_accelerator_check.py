"""experiments/accelerator_check.py: its --smoke mode end to end on CPU, and its refusals."""

import os
import pytest
import subprocess
import sys

from experiments import accelerator_check as check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.accelerator_check", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_smoke_runs_every_part_and_writes_no_document():
  proc = run_script("--smoke")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "**passed**" in out and "1 passed" in out            # the on-device parity run
  for method in ("| full_rank |", "| lost |"):
    assert method in out
  assert "matmul_backward=cpu_transposed" in out and "speed-up **" in out


def test_cpu_numbers_are_never_written_as_a_device_document():
  proc = run_script("--out_md=docs/benchmarks/cpu.md")
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and "Fix:" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(ROOT, "docs/benchmarks/cpu.md"))


def test_published_peaks_and_slugs():
  assert check.published_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
  assert check.published_peak("NVIDIA H100 PCIe")[0] == 756e12
  assert check.published_peak("TPU v5 lite")[0] == 197e12
  assert check.published_peak("TPU v5")[0] == 459e12
  assert check.published_peak("cpu") is None

  class Dev:
    device_kind = "NVIDIA H200"
  assert check.device_slug(Dev()) == "nvidia_h200"
