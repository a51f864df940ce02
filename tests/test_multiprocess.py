"""Two OS processes (one CPU device each, gloo collectives over 127.0.0.1) against one process
on two fake devices: same losses, exact resume from 2 processes in 1, from 1 in 2 and after a
SIGKILL, agreed preemption, agreed SparseLoRA shapes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers
from lost_jax.training import metrics
from lost_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
STEPS = 100_000          # the schedule's length; runs stop long before (stop_at / SIGTERM)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(job: dict, nproc: int, cache: str) -> list[subprocess.Popen]:
  """nproc processes of `job` (one device each), or one process on 2 fake devices.

  cache: the compilation cache directory they share, the test's own, not the session's
  (conftest.py): a process this test SIGKILLs could tear an entry it is writing, so those
  processes get a copy (`_copy`) that is thrown away.
  """
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_ENABLE_COMPILATION_CACHE="true", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             JAX_COMPILATION_CACHE_MAX_SIZE=str(64 << 30))   # the size turns on jax's file lock
  env["XLA_FLAGS"] = helpers.xla_flags(3 - nproc)
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, WORKER, json.dumps(dict(job, nproc=nproc, pid=i, port=port))],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
      for i in range(nproc)]


def _copy(cache: str, to: str) -> str:
  shutil.copytree(cache, to)
  return to


def _finish(procs, timeout=600) -> list[dict]:
  """Each process's RESULT; if one fails, the others are stopped and every output is shown."""
  texts = []
  for p in procs:
    try:
      texts.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      p.kill()
      texts.append(p.communicate()[0] + "\n(killed after the timeout)")
    if p.returncode != 0:
      for q in procs:
        q.kill()
  shown = "\n".join(f"--- process {i} (exit {p.returncode}):\n{t[-3000:]}"
                     for i, (p, t) in enumerate(zip(procs, texts + [""] * len(procs))))
  assert all(p.returncode == 0 for p in procs), shown
  return [dict(json.loads(text.split("RESULT", 1)[1]), output=text) for text in texts]


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir) if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process_on_two_devices(tmp_path):
  pre = dict(kind="pretrain", steps=STEPS)
  ft = dict(kind="finetune", steps=3)
  mp, ref, cache = str(tmp_path / "mp"), str(tmp_path / "ref"), str(tmp_path / "jax_cache")
  # 1. Pre-train in 2 processes until one of them (only) gets SIGTERM; meanwhile the
  #    1-process reference fine-tune runs.
  term = _start(dict(pre, workdir=mp), 2, cache)
  ft_ref = _start(dict(ft, workdir=str(tmp_path / "ft_ref")), 1, cache)
  deadline = time.time() + 600
  while len(_losses(mp)) < 2 and time.time() < deadline:
    assert all(p.poll() is None for p in term), term[0].communicate()[0][-3000:]
    time.sleep(0.2)
  term[1].send_signal(signal.SIGTERM)
  stopped = _finish(term)
  saved = {r["out"]["step"] for r in stopped}
  assert len(saved) == 1, stopped                 # every process saved the same step ...
  step = saved.pop()
  assert 2 <= step < 100, step
  assert sorted(int(d) for d in os.listdir(os.path.join(mp, "checkpoints"))
                if d.isdigit())[-1] == step       # ... and that checkpoint is complete
  # 2. Resume in 1 process (on 2 devices) for two steps, then in 2 processes until one of them
  #    is SIGKILLed past the next step (the other is then killed too); both are restarted.
  #    The 1-process reference runs uninterrupted; the 2-process fine-tune runs.
  end = step + 12
  in_one = _start(dict(pre, workdir=mp, stop_at=step + 2), 1, cache)
  straight = _start(dict(pre, workdir=ref, stop_at=end), 1, cache)
  ft_mp = _start(dict(ft, workdir=str(tmp_path / "ft_mp")), 2, cache)
  (one_proc,) = _finish(in_one)
  killed = _start(dict(pre, workdir=mp, stop_at=end), 2,
                  _copy(cache, str(tmp_path / "jax_cache_killed")))
  while max(s for s, _ in _losses(mp)) < step + 3 and time.time() < deadline + 600:
    assert all(p.poll() is None for p in killed), killed[0].communicate()[0][-3000:]
    time.sleep(0.2)
  for p in killed[::-1]:
    p.kill()
    time.sleep(1.0)
  killed_out = [p.communicate()[0] for p in killed]
  assert [p.returncode for p in killed] == [-signal.SIGKILL] * 2, killed_out[0][-3000:]
  kept = max(int(d) for d in os.listdir(os.path.join(mp, "checkpoints")) if d.isdigit())
  assert step + 2 <= kept < end, kept
  _finish(_start(dict(pre, workdir=mp, stop_at=end), 2, cache))
  _finish(straight)
  assert ("resuming a checkpoint written on 2 processes with 2 devices (data=2) on 2 devices "
          "(data=2)") in one_proc["output"], one_proc["output"][-2000:]
  assert ("resuming a checkpoint written on 2 devices (data=2) on 2 processes with 2 devices "
          "(data=2)") in killed_out[0], killed_out[0][-2000:]
  a, b = _losses(ref), _losses(mp)
  assert [s for s, _ in a] == list(range(1, end + 1))
  # The SIGTERM and SIGKILLed runs logged steps past their last checkpoint: keep each step's
  # last logged loss (the restarted runs log those steps again).
  got = dict(b)
  assert sorted(got) == [s for s, _ in a]
  np.testing.assert_allclose([got[s] for s, _ in a], [l for _, l in a], rtol=1e-6)
  assert [got[s] for s, _ in a] == [l for _, l in a]          # and in fact bit for bit
  print("pretrain losses 1 process x 2 devices:", a)
  print("pretrain losses 2 processes (SIGTERM at", step, "then resumed in 1, then in 2, "
        "SIGKILL past step", kept, "then restarted):", sorted(got.items()))
  # 3. SparseLoRA: process 0's eval rows ask for a shorter dense suffix than process 1's;
  #    both compile the agreed (max) length, and the metric is the 1-process one.
  (one,), two = _finish(ft_ref), _finish(ft_mp)
  assert any(x != y for x, y in zip(two[0]["asked"], two[1]["asked"])), two
  assert two[0]["agreed"] == two[1]["agreed"] == [[max(x, y)] * 2 for x, y in
                                                  zip(two[0]["asked"], two[1]["asked"])]
  assert two[0]["out"] == two[1]["out"]
  np.testing.assert_allclose(two[0]["out"]["eval_loss"], one["out"]["eval_loss"], rtol=1e-6)
  assert two[0]["out"]["eval_tokens"] == one["out"]["eval_tokens"]
  np.testing.assert_allclose([l for _, l in _losses(str(tmp_path / "ft_mp"))],
                             [l for _, l in _losses(str(tmp_path / "ft_ref"))], rtol=1e-6)
  print("finetune eval 1 process:", one["out"], "2 processes:", two[0]["out"])


def test_process_ids_outside_the_process_count_are_refused():
  from lost_jax import configs
  from lost_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  mesh = configs.pretrain_config("quickstart", "lost").mesh
  mesh.update(dict(distributed=True, coordinator_address="127.0.0.1:1", num_processes=2,
                   process_id=2))
  with pytest.raises(UserError, match="process_id=2"):
    distributed.initialize_distributed(mesh)
