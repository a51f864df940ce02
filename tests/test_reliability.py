"""Reliability through the command line: divergence, damaged checkpoints, SIGTERM, bad inputs.

Every run is a `python -m lost_jax.main` subprocess on a tiny dense model (1 layer, d=32,
seq 32), so what is checked is what a user sees: exit status, output lines, files on disk.
"""

import asyncio
import concurrent.futures
import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, fixed_batch, saved_state, subprocess_env, tiny_pretrain_config
from lost_jax import errors
from lost_jax.training import checkpoint
from lost_jax.training import metrics
from lost_jax.parallel import sharding
from lost_jax.data import tokenizer
from lost_jax.recipes import pretrain
from lost_jax.training import steps
from lost_jax.training import runtime
from lost_jax.training import state as train_state
from lost_jax.training import trainer

PRETRAIN = ["pretrain", f"--config={ROOT}/configs/pretrain.py:quickstart,full_rank"]
FINETUNE = ["finetune", f"--config={ROOT}/configs/finetune.py:quickstart",
            "--config.init.source=random"]
TINY = ["--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.ffn_dim=64",
        "--config.train.batch_size=2", "--config.data.seq_len=32",
        "--config.train.precision=float32", "--config.train.eval_batches=1",
        "--config.train.log_every=1"]
# Constant learning rate (after step 0): train.steps then changes nothing but where a run ends.
CONSTANT_LR = ["--config.train.warmup_frac=0", "--config.train.min_lr_ratio=1.0"]
STEPS = 30
STRAIGHT = TINY + CONSTANT_LR + [f"--config.train.steps={STEPS}", "--config.train.ckpt_every=1",
                                 "--config.train.keep_checkpoints=4",
                                 f"--config.train.eval_every={STEPS}"]
ENV = subprocess_env(PYTHONUNBUFFERED="1")


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "lost_jax.main", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, env=ENV)


def lines_of(proc) -> list[str]:
  """Output lines a user reads: stdout and stderr, tqdm's redrawn progress bars left out."""
  text = (proc.stdout + proc.stderr).replace("\r", "\n")
  return [line for line in text.splitlines() if line.strip() and "%|" not in line]


def steps_on_disk(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics.read_metrics(str(workdir)) if "loss" in r}


def assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves((a["params"], a["opt_state"])),
                  jax.tree.leaves((b["params"], b["opt_state"])), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 30-step run, checkpointed every step (the last 4 kept)."""
  tokenizer.stdlib_tokenizer(4096)   # trained once here, not by concurrent subprocesses
  workdir = tmp_path_factory.mktemp("straight") / "run"
  proc = cli(*PRETRAIN, f"--workdir={workdir}", *STRAIGHT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert steps_on_disk(workdir) == [27, 28, 29, 30]
  return workdir


# ------------------------------------------------------------------------------ non-finite


@pytest.mark.slow
def test_non_finite_step_leaves_params_and_optimizer_state_exactly_unchanged():
  cfg = tiny_pretrain_config("full_rank", rank=0, seq_len=128, warmup_frac=0.0, steps=10,
                             model=dict(vocab_size=64, d_model=32, ffn_dim=64, n_layers=1,
                                        n_kv_heads=4))
  mesh = sharding.make_mesh(cfg.mesh)
  setup = pretrain.make_setup(cfg, mesh)
  state, rest = setup.init(jax.random.key(0))
  step_fn = steps.make_train_step(setup, 1)
  good = fixed_batch(16, 8, 64)
  bad = {**good, "weights": np.where(np.arange(8) == 3, np.nan, 1.0).astype(np.float32)[None]
         .repeat(16, 0)}
  state, m = step_fn(state, rest, train_state.to_global(good, mesh))   # one real step: Adam moments
  assert not bool(m["skipped"])
  before = jax.tree.map(np.array, {k: state[k] for k in ("params", "opt_state", "step")})
  state, m = step_fn(state, rest, train_state.to_global(bad, mesh))
  assert bool(m["skipped"]) and not np.isfinite(float(m["loss"]))
  assert_same_state(before, state)                 # bit-identical, Adam's count included
  assert int(state["step"]) == int(before["step"]) + 1   # the batch is consumed, not applied
  state, m = step_fn(state, rest, train_state.to_global(good, mesh))
  assert not bool(m["skipped"]) and np.isfinite(float(m["loss"]))
  changed = [not np.array_equal(np.asarray(x), y) for x, y in
             zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before["params"]))]
  assert all(changed)


def test_a_non_finite_state_is_never_saved():
  class Recorder:   # stands in for the Checkpointer: records what would be saved

    def __init__(self):
      self.saved = []

    def wait(self):
      pass

    def latest_step(self):
      return 4

    def save(self, step, *args, **kwargs):
      self.saved.append(step)

  ckpt = Recorder()
  finite = {"params": {"w": jnp.ones((2, 3))}, "opt_state": (jnp.zeros(3), jnp.int32(5))}
  trainer.save_finite(ckpt, 5, finite, None, None, {})
  assert ckpt.saved == [5]
  for bad in (jnp.nan, jnp.inf):
    broken = {"params": {"w": jnp.ones((2, 3)).at[1, 2].set(bad)},
              "opt_state": (jnp.zeros(3), jnp.int32(5))}
    with pytest.raises(errors.TrainingDiverged, match=r"after step 6 .* Last good checkpoint: "
                       r"step 4"):
      trainer.save_finite(ckpt, 6, broken, None, None, {})
  broken = {"params": finite["params"], "opt_state": (jnp.zeros(3).at[0].set(jnp.nan),
                                                      jnp.int32(5))}
  with pytest.raises(errors.TrainingDiverged):
    trainer.save_finite(ckpt, 7, broken, None, None, {})
  assert ckpt.saved == [5]


def test_the_save_check_finds_one_inf_or_nan_in_any_float_leaf_and_never_overflows():
  rng = np.random.RandomState(0)
  leaves = ([jnp.asarray(rng.randn(5, 7), jnp.float32) for _ in range(5)]
            + [jnp.asarray(rng.randn(3, 4), jnp.bfloat16), jnp.arange(3),
               jnp.full((1000,), 3e38, jnp.float32)])   # finite, and a plain sum overflows
  assert bool(trainer.all_finite(leaves))
  for i in (0, 3, 5, 7):
    for bad in (np.inf, -np.inf, np.nan):
      broken = list(leaves)
      broken[i] = broken[i].reshape(-1).at[i].set(bad).reshape(broken[i].shape)
      want = all(np.isfinite(np.asarray(x, np.float32)).all() for x in broken)
      assert not want and not bool(trainer.all_finite(broken)), (i, bad)
  assert bool(trainer.all_finite([jnp.arange(3)]))   # no float leaf: nothing to check


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
  workdir = tmp_path / "diverge"
  diverge = [*TINY, "--config.train.lr=1e6", "--config.train.clip_norm=0",
             "--config.train.steps=30", "--config.train.ckpt_every=1",
             "--config.train.keep_checkpoints=1", "--config.train.max_skipped_steps=3"]
  proc = cli(*PRETRAIN, f"--workdir={workdir}", *diverge)
  out = lines_of(proc)
  print("\n".join(out))
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = out[-1]
  m = re.match(r"error: training diverged: steps (\d+)\.\.(\d+) had a non-finite loss .*"
               r"config\.train\.max_skipped_steps=3\).*Last good checkpoint: step (\d+) \((.*)\)"
               r"\. Fix: re-run the command with a lower config\.train\.lr", last)
  assert m, last
  first_bad, stop, good = int(m[1]), int(m[2]), int(m[3])
  assert good == first_bad - 1 and stop - first_bad + 1 >= 3 and stop < 30
  assert m[4] == str(workdir / "checkpoints" / str(good))
  # keep_checkpoints=1 rotated every finite save away but the last; nothing after it was saved.
  assert steps_on_disk(workdir) == [good]
  state = saved_state(workdir, good)[1]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["opt_state"]))
  skipped = [line for line in out if "not finite, update skipped" in line]
  assert len(skipped) == stop - first_bad + 1
  assert max(r.get("skipped_steps", 0) for r in metrics.read_metrics(str(workdir))) >= 3
  # The run resumes from it with a sane learning rate.
  proc = cli(*PRETRAIN, f"--workdir={workdir}", *diverge[:-6], "--config.train.clip_norm=0",
             "--config.train.steps=4", "--config.train.lr=1e-3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"steps {good}->4 of 4" in proc.stdout and "done: step 4" in proc.stdout


# ------------------------------------------------------------------- damaged checkpoints


def _garbage_metadata(step_dir):
  """The run's meta item (read first, by check_compatible) and the state's tree metadata."""
  for path in (("meta", "metadata"), ("state", "_METADATA")):
    with open(os.path.join(step_dir, *path), "w") as f:
      f.write("garbage{{{")


def _truncate_a_data_file(step_dir):
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  largest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
  os.truncate(largest, 10)


def _delete_item_directory(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.slow
def test_damaged_checkpoints_are_moved_aside_and_an_intact_one_resumes(straight, tmp_path):
  workdir = tmp_path / "damaged"
  shutil.copytree(straight, workdir)
  expected = saved_state(straight, STEPS)[1]
  ckpts = workdir / "checkpoints"
  _garbage_metadata(ckpts / "30")
  _truncate_a_data_file(ckpts / "29")
  _delete_item_directory(ckpts / "28")
  proc = cli(*PRETRAIN, f"--workdir={workdir}", *STRAIGHT)
  out = lines_of(proc)
  print("\n".join(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  damaged = [line for line in out if line.startswith("checkpoint step")]
  assert len(damaged) == 3
  for line, step, why in zip(damaged, (30, 29, 28), ("JSONDecodeError", "OUT_OF_RANGE", "state")):
    assert line.startswith(f"checkpoint step {step} is damaged (") and why in line, line
    assert line.endswith(f"moved it to {workdir}/checkpoints_damaged/{step} and resumed from "
                         "step 27")
  assert sorted(os.listdir(workdir / "checkpoints_damaged")) == ["28", "29", "30"]
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
  assert "steps 27->30 of 30" in proc.stdout
  assert_same_state(saved_state(workdir, STEPS)[1], expected)   # resumed exactly from step 27
  assert {s: v for s, v in losses(workdir).items() if s > 27} == {
      s: v for s, v in losses(straight).items() if s > 27}


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_and_nothing_is_moved(straight, tmp_path):
  workdir = tmp_path / "all_damaged"
  os.makedirs(workdir / "checkpoints")
  for step in (29, 30):
    shutil.copytree(straight / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
  _truncate_a_data_file(workdir / "checkpoints" / "30")
  _delete_item_directory(workdir / "checkpoints" / "29")
  proc = cli(*PRETRAIN, f"--workdir={workdir}", *STRAIGHT)
  out = lines_of(proc)
  print("\n".join(out))
  assert proc.returncode == 2
  assert len(out) == 1 and out[0].startswith("error: no checkpoint in "), out
  assert "step 30: ValueError: OUT_OF_RANGE" in out[0] and "step 29: KeyError" in out[0]
  # The fix is safe whatever else uses the workdir: nothing to move, a new --workdir.
  assert out[0].endswith("if the files are damaged, start again in a new --workdir (nothing "
                         "here was moved or changed)."), out
  assert steps_on_disk(workdir) == [29, 30]
  assert not (workdir / "checkpoints_damaged").exists()


@pytest.mark.slow
def test_reads_abandoned_by_a_failed_restore_print_nothing_other_errors_still_do(
    monkeypatch, capsys):
  monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  checkpoint._silence_abandoned_reads()
  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError, match="Event loop is closed") as closed:
    loop.call_soon_threadsafe(print)   # what a late tensorstore read does
  sys.excepthook(RuntimeError, closed.value, closed.value.__traceback__)
  assert capsys.readouterr().err == ""
  try:
    raise RuntimeError("Event loop is closed")   # the same text from elsewhere is kept
  except RuntimeError as e:
    sys.excepthook(RuntimeError, e, e.__traceback__)
  assert "Event loop is closed" in capsys.readouterr().err


# ------------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_resume_is_exact(straight, tmp_path):
  workdir = tmp_path / "preempted"
  # Checkpoints only at the end: the one found afterwards is the one SIGTERM wrote.
  long_run = [a for a in STRAIGHT if not a.startswith(("--config.train.steps",
                                                       "--config.train.ckpt_every",
                                                       "--config.train.eval_every"))]
  long_run += ["--config.train.steps=100000", "--config.train.ckpt_every=100000",
               "--config.train.eval_every=100000"]
  with open(tmp_path / "stderr.txt", "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "lost_jax.main", *PRETRAIN,
                             f"--workdir={workdir}", *long_run], stdout=subprocess.PIPE,
                            stderr=err, text=True, cwd=ROOT, env=ENV)
    seen = []
    for line in proc.stdout:
      seen.append(line)
      if line.startswith("step 2/"):
        proc.send_signal(signal.SIGTERM)
        break
    rest, _ = proc.communicate(timeout=300)
  out = "".join(seen) + rest
  assert proc.returncode == 0, open(tmp_path / "stderr.txt").read()[-3000:]
  stopped = int(re.search(r"done: step (\d+)", out)[1])
  assert 2 <= stopped < STEPS - 1, out
  assert steps_on_disk(workdir) == [stopped]
  proc = cli(*PRETRAIN, f"--workdir={workdir}", *STRAIGHT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"steps {stopped}->{STEPS} of {STEPS}" in proc.stdout
  assert losses(workdir) == losses(straight)
  assert_same_state(saved_state(workdir, STEPS)[1], saved_state(straight, STEPS)[1])


# ---------------------------------------------------------------------------- bad inputs


def _bad_files(tmp):
  """Data, tokenizer and workdir paths for the bad-input table."""
  os.makedirs(tmp / "data", exist_ok=True)
  (tmp / "data" / "empty.jsonl").write_text("")
  (tmp / "data" / "garbage.jsonl").write_bytes(b"\xff\xfe\x00garbage {{{\n" * 50)
  full = gzip.compress(b"".join(json.dumps({"text": f"document {i} " * 40}).encode() + b"\n"
                                for i in range(200)))
  (tmp / "data" / "truncated.jsonl.gz").write_bytes(full[:len(full) // 2])
  (tmp / "garbage.model").write_bytes(b"this is not a sentencepiece model")
  (tmp / "a_file").write_text("not a directory")
  os.makedirs(tmp / "hf_like", exist_ok=True)
  (tmp / "hf_like" / "config.json").write_text(json.dumps({"model_type": "llama"}))
  # More records of empty text than the probe reads: a stream that would filter forever.
  (tmp / "data" / "empty_texts.jsonl").write_text('{"text": ""}\n' * 3000)
  (tmp / "bad_syntax.py").write_text("def get_config(:\n")
  (tmp / "raises.py").write_text("def get_config():\n  raise RuntimeError('boom')\n")
  os.makedirs(tmp / "ckpt_is_file", exist_ok=True)
  (tmp / "ckpt_is_file" / "checkpoints").write_text("not a directory")
  (tmp / "no_get_config.py").write_text("SIZE = 1\n")
  (tmp / "returns_3.py").write_text("def get_config():\n  return 3\n")
  os.makedirs(tmp / "hf_bad_json", exist_ok=True)
  (tmp / "hf_bad_json" / "config.json").write_text('{"model_type": "llama", ')
  (tmp / "hf_bad_json" / "model.safetensors").write_bytes(b"")


# (name, command-line arguments after the command's preset, text the one line must contain)
BAD_INPUTS = [
    ("unknown size", ["pretrain", f"--config={ROOT}/configs/pretrain.py:tiny,lost"],
     "unknown size 'tiny'"),
    ("unknown method", ["pretrain", f"--config={ROOT}/configs/pretrain.py:quickstart,adam"],
     "unknown method 'adam'"),
    ("unknown fine-tune preset", ["finetune", f"--config={ROOT}/configs/finetune.py:llama9"],
     "unknown preset 'llama9'"),
    ("missing config file", ["pretrain", f"--config={ROOT}/configs/nope.py"], "--config="),
    ("unknown setting", PRETRAIN + ["--config.train.learning_rate=1e-3"],
     "--config.train.learning_rate"),
    ("unparsable value", PRETRAIN + ["--config.train.lr=fast"], "--config.train.lr"),
    ("unknown command", ["pretrian", f"--config={ROOT}/configs/pretrain.py"], "pretrian"),
    ("negative lr", PRETRAIN + ["--config.train.lr=-1.0"], "config.train.lr"),
    ("nan lr", PRETRAIN + ["--config.train.lr=nan"], "config.train.lr"),
    ("warmup > 1", PRETRAIN + ["--config.train.warmup_frac=1.5"], "config.train.warmup_frac"),
    ("negative clip", PRETRAIN + ["--config.train.clip_norm=-1.0"], "config.train.clip_norm"),
    ("negative weight decay", PRETRAIN + ["--config.train.weight_decay=-0.1"],
     "config.train.weight_decay"),
    ("b2 = 1", PRETRAIN + ["--config.train.b2=1.0"], "config.train.b2"),
    ("eval every 0", PRETRAIN + ["--config.train.eval_every=0"], "config.train.eval_every"),
    ("ckpt every 0", PRETRAIN + ["--config.train.ckpt_every=0"], "config.train.ckpt_every"),
    ("keep 0 checkpoints", PRETRAIN + ["--config.train.keep_checkpoints=0"],
     "config.train.keep_checkpoints"),
    ("max skipped 0", PRETRAIN + ["--config.train.max_skipped_steps=0"],
     "config.train.max_skipped_steps"),
    ("zero steps", PRETRAIN + ["--config.train.steps=0"], "config.train.steps"),
    ("batch not a multiple of micro-batches", PRETRAIN + ["--config.train.microbatches=3"],
     "config.train.batch_size"),
    ("zero micro-batches", PRETRAIN + ["--config.train.microbatches=0"],
     "config.train.microbatches"),
    ("unknown precision", PRETRAIN + ["--config.train.precision=fp8"],
     "config.train.precision"),
    ("unknown optimizer", PRETRAIN + ["--config.train.optimizer=sgd"],
     "config.train.optimizer"),
    ("impossible mesh", PRETRAIN + ["--config.mesh.data=3"], "config.mesh"),
    ("heads do not divide d_model", PRETRAIN + ["--config.model.n_heads=3"],
     "config.model.n_heads"),
    ("impossible LOST rank", ["pretrain", f"--config={ROOT}/configs/pretrain.py:quickstart,lost",
                              "--config.model.linear.rank=1000"], "config.model.linear.rank"),
    ("LOST sparsity > 1", ["pretrain", f"--config={ROOT}/configs/pretrain.py:quickstart,lost",
                           "--config.model.linear.sparsity=1.5"],
     "config.model.linear.sparsity"),
    ("LOST gamma > 1", ["pretrain", f"--config={ROOT}/configs/pretrain.py:quickstart,lost",
                        "--config.model.linear.gamma=2.0"], "config.model.linear.gamma"),
    ("SLTrain density 0", ["pretrain", f"--config={ROOT}/configs/pretrain.py:quickstart,sltrain",
                           "--config.model.linear.density=0.0"],
     "config.model.linear.density"),
    ("sequence length 1", PRETRAIN + ["--config.data.seq_len=1"], "config.data.seq_len"),
    ("unknown data source", PRETRAIN + ["--config.data.source=s3"], "config.data.source"),
    ("no data files match", PRETRAIN + ["--config.data.source=files",
                                        "--config.data.files={tmp}/data/missing-*.jsonl"],
     "config.data.files"),
    ("empty data file", PRETRAIN + ["--config.data.source=files",
                                    "--config.data.files={tmp}/data/empty.jsonl"],
     "config.data.files"),
    ("garbage data file", PRETRAIN + ["--config.data.source=files",
                                      "--config.data.files={tmp}/data/garbage.jsonl"],
     "config.data.files"),
    ("truncated gzip data file", PRETRAIN + ["--config.data.source=files",
                                             "--config.data.files={tmp}/data/truncated.jsonl.gz"],
     "config.data.files"),
    ("missing tokenizer", PRETRAIN + ["--config.data.tokenizer={tmp}/none.model"],
     "config.data.tokenizer"),
    ("garbage tokenizer", PRETRAIN + ["--config.data.tokenizer={tmp}/garbage.model"],
     "config.data.tokenizer"),
    ("workdir is a file", PRETRAIN + ["--workdir={tmp}/a_file"], "--workdir"),
    ("workdir inside a file", PRETRAIN + ["--workdir={tmp}/a_file/run"], "--workdir"),
    ("missing workdir flag", PRETRAIN + ["--workdir="], "--workdir"),
    ("workdir of another model", PRETRAIN + ["--workdir={straight}",
                                             "--config.model.d_model=64"], "model.d_model"),
    ("LoRA rank 0", FINETUNE + ["--config.lora.rank=0"], "config.lora.rank"),
    ("LoRA rank too large", FINETUNE + ["--config.lora.rank=4096"], "config.lora.rank"),
    ("LoRA alpha 0", FINETUNE + ["--config.lora.alpha=0.0"], "config.lora.alpha"),
    ("LoRA dropout 1", FINETUNE + ["--config.lora.dropout=1.0"], "config.lora.dropout"),
    ("unknown LoRA target", FINETUNE + ["--config.lora.targets=q,x"], "config.lora.targets"),
    ("FFN sparsity 1.5", FINETUNE + ["--config.sparse.ffn=1.5@1-3"], "config.sparse.ffn"),
    ("unparsable attention sparsity", FINETUNE + ["--config.sparse.attn=half@2"],
     "config.sparse.attn"),
    ("sparse layer beyond the model", FINETUNE + ["--config.sparse.attn=0.5@9"],
     "config.sparse.attn"),
    ("estimator rank 0", FINETUNE + ["--config.sparse.estimator_rank=0"],
     "config.sparse.estimator_rank"),
    ("sparse bucket 0", FINETUNE + ["--config.sparse.bucket=0"], "config.sparse.bucket"),
    ("sparse start > 1", FINETUNE + ["--config.sparse.start_frac=2.0"],
     "config.sparse.start_frac"),
    ("prompt longer than a row", FINETUNE + ["--config.data.max_prompt_len=64"],
     "config.data.max_prompt_len"),
    ("missing fine-tune base", FINETUNE + ["--config.init.source=pretrain",
                                           "--config.init.path={tmp}/no_such_run"],
     "config.init.path"),
    ("HF-like directory as a pre-training base", FINETUNE + ["--config.init.source=pretrain",
                                                            "--config.init.path={tmp}/hf_like"],
     "config.init"),
    ("unknown base source", FINETUNE + ["--config.init.source=s3"], "config.init.source"),
    # second round
    ("config file with a syntax error", ["pretrain", "--config={tmp}/bad_syntax.py"],
     "SyntaxError: invalid syntax at"),
    ("config file whose get_config raises", ["pretrain", "--config={tmp}/raises.py"],
     "RuntimeError: boom at"),
    ("records of empty text only", PRETRAIN + ["--config.data.source=files",
                                               "--config.data.files={tmp}/data/empty_texts.jsonl"],
     "no non-empty document"),
    ("checkpoints/ is a file", PRETRAIN + TINY + ["--workdir={tmp}/ckpt_is_file"],
     "the checkpoint directory"),
    ("start-up timeout 0", PRETRAIN + ["--config.mesh.init_timeout_s=0"],
     "config.mesh.init_timeout_s"),
    ("evaluate without a workdir", ["evaluate", "--step=3"], "evaluate needs --workdir"),
    ("generate from a run and a base", ["generate", "--workdir={tmp}", "--base={tmp}",
                                        "--prompt=hi"], "not both"),
    ("export without --out", ["export", "--workdir={tmp}"], "export needs --out"),
    # third round
    ("config file without get_config", ["pretrain", "--config={tmp}/no_get_config.py"],
     "no_get_config.py: the file defines no get_config()"),
    ("get_config returns no ConfigDict", ["pretrain", "--config={tmp}/returns_3.py"],
     "returns_3.py: its get_config() returned 3, not an ml_collections ConfigDict"),
    ("override of a group the config lacks", PRETRAIN + ["--config.optimizer.lr=0.1"],
     "--config.optimizer.lr: the config has no setting 'optimizer'"),
    ("HF base whose config.json is not JSON",
     ["finetune", f"--config={ROOT}/configs/finetune.py:quickstart",
      "--config.init.path={tmp}/hf_bad_json"], "its config.json cannot be read as JSON"),
]


def _bad_input_run(args, tmp, straight):
  args = [a.format(tmp=tmp, straight=straight) for a in args]
  if args[0] in ("pretrain", "finetune") and not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp}/run_{abs(hash(tuple(args)))}")
  return cli(*args, timeout=300)


@pytest.mark.slow
def test_every_bad_input_is_one_line_with_exit_status_2(straight, tmp_path):
  _bad_files(tmp_path)
  before = steps_on_disk(straight)
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    procs = list(pool.map(lambda case: _bad_input_run(case[1], tmp_path, straight),
                          BAD_INPUTS))
  report, failures = [], []
  for (name, _, expected), proc in zip(BAD_INPUTS, procs):
    out = (proc.stdout + proc.stderr).strip().splitlines()
    report.append(f"{name}: {' | '.join(out)}")
    if not (proc.returncode == 2 and len(out) == 1 and out[0].startswith("error: ") and
            expected in out[0] and "Fix:" in out[0]):
      failures.append(f"{name} (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
  print("\n".join(report))
  assert not failures, "\n\n".join(failures)
  assert len(BAD_INPUTS) >= 30
  assert steps_on_disk(straight) == before      # the refused run touched nothing


# ---------------------------------------------------------- second round: waits, locks, paths


def test_a_second_run_on_a_locked_workdir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  args = [*PRETRAIN, f"--workdir={workdir}", *TINY, "--config.train.steps=2"]
  with open(workdir / ".lock", "w") as held:   # a live run's lock (this process holds it)
    held.write("pid 4242 on host elsewhere\n")
    held.flush()
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    proc = cli(*args, timeout=300)
    out = lines_of(proc)
    assert proc.returncode == 2 and len(out) == 1, out
    assert "is in use by a running lost_jax process (pid 4242 on host elsewhere)" in out[0]
    assert not os.path.exists(workdir / "checkpoints") and not os.path.exists(
        workdir / "config.json")                   # refused before anything was written
  # The holder died (the OS released its lock): the file it left is taken over and names the
  # new holder (in-process: a run adds nothing to what the lock decides).
  runtime.lock_workdir(str(workdir))
  assert (workdir / ".lock").read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"
  runtime.unlock_workdir(str(workdir))


def test_a_tilde_workdir_is_under_home_and_an_unwritable_home_costs_no_warning(tmp_path):
  home = tmp_path / "home"
  os.makedirs(home)
  for name in (".config", ".cache"):     # matplotlib can create neither of its directories
    (home / name).write_text("")
  proc = subprocess.run([sys.executable, "-m", "lost_jax.main", *PRETRAIN, "--workdir=~/run",
                         *TINY, "--config.train.steps=2"], capture_output=True, text=True,
                        timeout=300, cwd=tmp_path,
                        # the tokenizer cache stays where this process has it: without
                        # LOST_JAX_CACHE its default is under HOME, which this test breaks
                        env=dict(ENV, HOME=str(home), LOST_JAX_CACHE=tokenizer.cache_dir()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(home / "run" / "checkpoints" / "2")
  assert os.path.exists(home / "run" / "train_loss.png")       # plotted all the same
  assert not os.path.exists(tmp_path / "~")
  assert not [line for line in lines_of(proc) if "matplotlib" in line.lower()], lines_of(proc)


def test_environment_faults_are_one_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  cases = [("JAX_PLATFORMS misspelled", dict(JAX_PLATFORMS="tpuu"), "JAX_PLATFORMS='tpuu'"),
           ("tokenizer cache not writable", dict(LOST_JAX_CACHE=str(tmp_path / "a_file" / "c")),
            "the tokenizer cache")]
  if not any(d.platform == "gpu" for d in jax.devices()) and not any(
      importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    # A platform JAX knows, without its plugin: JAX itself fails an assertion.
    cases.append(("JAX_PLATFORMS naming an absent platform", dict(JAX_PLATFORMS="cuda"),
                  "JAX_PLATFORMS='cuda': JAX started no backend"))

  def run(case):
    name, env, _ = case
    return subprocess.run([sys.executable, "-m", "lost_jax.main", *PRETRAIN, *TINY,
                           f"--workdir={tmp_path / name.replace(' ', '_')}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(ENV, **env))

  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    procs = list(pool.map(run, cases))
  for (name, _, expected), proc in zip(cases, procs):
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(out) == 1 and out[0].startswith("error: "), (name, out)
    assert expected in out[0] and "Fix:" in out[0], (name, out)


def test_a_process_whose_peers_never_arrive_says_so_and_ends_in_one_line(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # Process 0 hosts a coordinator nobody joins; process 1 is given an address nobody serves.
  cases = [(0, f"127.0.0.1:{port}"), (1, "no-such-host.invalid:1234")]

  def run(case):
    start = time.time()
    proc = cli(*PRETRAIN, *TINY, f"--workdir={tmp_path / f'run{case[0]}'}",
               "--config.mesh.distributed=True", "--config.mesh.num_processes=2",
               f"--config.mesh.process_id={case[0]}",
               f"--config.mesh.coordinator_address={case[1]}", "--config.mesh.init_timeout_s=4",
               timeout=120)
    return proc, time.time() - start

  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    results = list(pool.map(run, cases))
  for (pid, address), (proc, waited) in zip(cases, results):
    out = lines_of(proc)
    assert proc.returncode == 2, (proc.returncode, out, proc.stderr[-2000:])
    assert out[-1].startswith("error: multi-process start-up: not every process reached the "
                              f"coordinator {address}, process {pid} of 2 within "
                              "config.mesh.init_timeout_s=4 s"), out
    assert any(line.startswith("start-up: waiting for the other processes") for line in out)
    assert waited < 60, waited


def test_a_torn_last_metrics_line_is_skipped_and_the_next_row_starts_a_new_line(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "lo')                   # killed mid-append
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0}]
  writer.write(2, {"loss": 2.0})                 # the resumed run appends
  writer.close()
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0},
                                                 {"step": 2, "loss": 2.0}]


def test_a_resume_whose_base_or_data_changed_under_the_same_path_is_refused(
    pretrained_copy, tmp_path, capsys):
  from helpers import tiny_finetune_config  # pylint: disable=g-import-not-at-top
  from lost_jax.recipes import finetune  # pylint: disable=g-import-not-at-top
  from lost_jax.recipes import inputs  # pylint: disable=g-import-not-at-top
  # Fine-tune data from a file; two steps, then the base and the data change in place.
  records = [{"instruction": f"What is {i} + {i}?", "input": "", "output": str(2 * i)}
             for i in range(64)]
  data = tmp_path / "train.json"
  data.write_text(json.dumps(records))
  cfg = tiny_finetune_config(pretrained_copy, sparse=False, steps=2)
  # No eval_file: the last eval_size records are held out, said and recorded in the workdir.
  cfg.data.update(dict(task="files", train_file=str(data), eval_file="", eval_size=16))
  workdir = str(tmp_path / "ft")
  finetune.finetune_and_evaluate(cfg, workdir, quiet=True)
  split = {"task": "files", "train": f"records 0..47 of {data}",
           "eval": f"records 48..63 of {data}, held out of training"}
  assert json.load(open(os.path.join(workdir, finetune.SPLIT_FILE))) == split
  assert (f"data: no eval_file: training on {split['train']}; evaluating on {split['eval']} "
          f"(recorded in {finetune.SPLIT_FILE})") in capsys.readouterr().out.splitlines()
  again = tiny_finetune_config(pretrained_copy, sparse=False, steps=4)
  again.data.update(cfg.data.to_dict())
  data.write_text(json.dumps(records[::-1]))            # same path, same size, other order
  with pytest.raises(errors.UserError, match=r"inputs\.data: 1 file\(s\) differ .*train\.json: "
                     "checkpoint"):
    finetune.finetune_and_evaluate(again, workdir, quiet=True)
  data.write_text(json.dumps(records))
  step_dir = os.path.join(pretrained_copy, "checkpoints", "60", "state")
  before = inputs.tree_signature(step_dir)
  victim = max((os.path.join(step_dir, name) for name in before), key=os.path.getsize)
  with open(victim, "ab") as f:        # the base's newest checkpoint rewritten (still readable)
    f.write(b"\0")
  with pytest.raises(errors.UserError, match=r"inputs\.base: 1 file\(s\) differ .*\(checkpoints/"
                     "60/state/"):
    finetune.finetune_and_evaluate(again, workdir, quiet=True)


def test_file_signature_sees_the_head_the_tail_and_the_size_not_only_the_path(tmp_path):
  from lost_jax.recipes import inputs  # pylint: disable=g-import-not-at-top
  path = tmp_path / "f.bin"
  body = bytearray(np.random.default_rng(0).bytes(3 << 20))
  path.write_bytes(bytes(body))
  sig = inputs.file_signature(str(path))
  assert sig.startswith(f"{3 << 20}:")
  for where in (0, len(body) - 1):                      # first and last MiB
    changed = bytearray(body)
    changed[where] ^= 1
    path.write_bytes(bytes(changed))
    assert inputs.file_signature(str(path)) != sig
  path.write_bytes(bytes(body) + b"x")
  assert inputs.file_signature(str(path)) != sig
  path.write_bytes(bytes(body))
  assert inputs.file_signature(str(path)) == sig


def test_a_base_run_whose_newest_checkpoint_is_damaged_is_read_from_the_previous_one(
    pretrained_copy, capsys):
  ckpts = os.path.join(pretrained_copy, "checkpoints")
  shutil.copytree(os.path.join(ckpts, "60"), os.path.join(ckpts, "61"))
  _truncate_a_data_file(os.path.join(ckpts, "61"))
  step, params = checkpoint.read_params(pretrained_copy)
  assert step == 60 and params is not None
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith(
      f"checkpoint step 61 of {pretrained_copy} is damaged (") and out[0].endswith(
          "using step 60"), out
  assert sorted(os.listdir(ckpts)) == ["60", "61"]          # a base is never changed
  _truncate_a_data_file(os.path.join(ckpts, "60"))
  with pytest.raises(errors.UserError, match=r"no checkpoint of .* can be read: step 61: .*; "
                     r"step 60: .*Fix: point at a run with an intact"):
    checkpoint.read_params(pretrained_copy)


@pytest.mark.slow
def test_data_worker_processes_print_nothing_on_ctrl_c_or_after_a_resume(tmp_path):
  workdir = tmp_path / "workers"
  args = [*PRETRAIN, f"--workdir={workdir}", *TINY, "--config.data.worker_count=2"]
  # Ctrl-C in a terminal signals the whole process group, data workers included.
  proc = subprocess.Popen([sys.executable, "-m", "lost_jax.main", *args,
                           "--config.train.steps=100000"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
                          start_new_session=True)
  deadline = time.time() + 300
  while not any(r.get("step", 0) >= 3 for r in metrics.read_metrics(str(workdir))):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.5)
  os.killpg(proc.pid, signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  assert "Warning" not in err, err[-3000:]
  stopped = int(re.search(r"done: step (\d+)", out)[1])
  assert steps_on_disk(workdir)[-1] == stopped
  resumed = cli(*args, f"--config.train.steps={stopped + 2}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"done: step {stopped + 2}" in resumed.stdout
  assert "Traceback" not in resumed.stderr and "Exception ignored" not in resumed.stderr, \
      resumed.stderr[-3000:]
  # A run long enough for the workers to fill their buffers: the batches in flight at its end
  # are unlinked by multiprocessing's resource tracker, which must not warn after `done:`.
  fresh = cli(*PRETRAIN, f"--workdir={tmp_path / 'fresh'}", *TINY,
              "--config.data.worker_count=2", "--config.train.steps=30")
  assert fresh.returncode == 0 and "done: step 30" in fresh.stdout, fresh.stderr[-3000:]
  assert "Warning" not in fresh.stderr and "leaked" not in fresh.stderr, fresh.stderr[-3000:]


def test_damaged_base_files_are_one_line(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from helpers import TINY_MODEL, smollm2_gguf  # pylint: disable=g-import-not-at-top
  from lost_jax import configs  # pylint: disable=g-import-not-at-top
  from lost_jax.formats import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  from lost_jax.formats import hf  # pylint: disable=g-import-not-at-top
  from lost_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  cfg = configs.model_config("quickstart")
  cfg.update(TINY_MODEL)
  base = str(tmp_path / "hf")
  hf.save_hf_llama(Llama(cfg, rngs=nnx.Rngs(0)), base, dtype="float32")
  weights, config = os.path.join(base, "model.safetensors"), os.path.join(base, "config.json")
  good_weights, good_config = open(weights, "rb").read(), open(config).read()
  hf.load_hf_llama(base)                                            # intact: loads
  damage = [
      (weights, good_weights[:len(good_weights) // 2], "is not a readable safetensors file"),
      (weights, b"garbage" * 100, "is not a readable safetensors file"),
      (config, json.dumps({k: v for k, v in json.loads(good_config).items()
                           if k != "hidden_size"}), "config.json: hidden_size missing"),
      (config, "{garbage", "cannot be read as JSON"),
  ]
  from lost_jax.recipes import base as base_lib  # pylint: disable=g-import-not-at-top
  ft = configs.finetune_config("quickstart")
  ft.init.path = base
  for path, content, expected in damage:
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
      f.write(content)
    with pytest.raises(errors.UserError, match=expected):
      hf.load_hf_llama(base)
    if path == config and "garbage" in content:   # what a fine-tune reads first says so too
      with pytest.raises(errors.UserError, match=r"its config\.json cannot be read as JSON"):
        base_lib.base_kind(ft)
    open(weights, "wb").write(good_weights)
    open(config, "w").write(good_config)
  cut = tmp_path / "cut.gguf"
  with open(smollm2_gguf(), "rb") as f:
    cut.write_bytes(f.read(200_000))                     # the header, then cut short
  with pytest.raises(errors.UserError, match="is not a readable GGUF file .*cut short"):
    gguf_lib.load_gguf_llama(str(cut))


# ------------------------------------------------ third round: machine faults, Ctrl-C, refusals


def _raised_in(filename: str, exc: BaseException) -> BaseException:
  """`exc` as raised by code in a file of that name (what the fault lines look at)."""
  scope = {"exc": exc}
  exec(compile("def throw():\n  raise exc\n", filename, "exec"), scope)  # pylint: disable=exec-used
  try:
    scope["throw"]()
  except BaseException as e:  # pylint: disable=broad-except
    return e
  raise AssertionError("unreachable")


_ORBAX_FULL = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.mu.embed/0.0" in OCDBT database '
               'at local file "/r/run/checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-'
               'tmp/ocdbt.process_0/": Failed writing: "/r/run/checkpoints/6.orbax-checkpoint-'
               'tmp/d/bb": Failed to write 465097 bytes to file 11: No space left on device '
               "[os_error_code='28']")


@pytest.mark.parametrize("make, platforms, expected", [
    (lambda: OSError(28, "No space left on device", "/r/run/metrics.jsonl"), "",
     ("cannot write /r/run/metrics.jsonl (No space left on device). Fix: free space", 1)),
    (lambda: OSError(122, "Disk quota exceeded", "/r/run/config.json"), "",
     ("cannot write /r/run/config.json (Disk quota exceeded)", 1)),
    (lambda: OSError(30, "Read-only file system"), "",
     ("cannot write a file (Read-only file system)", 1)),
    # Orbax's background save: a ValueError whose message carries tensorstore's errno text.
    (lambda: ValueError(_ORBAX_FULL), "",
     ("cannot write checkpoint step 6 in /r/run/checkpoints (No space left on device)", 1)),
    (lambda: RuntimeError("save failed"), "", None),
    (lambda: _raised_in("/site/jax/_src/xla_bridge.py", AssertionError()), "cuda",
     ("JAX_PLATFORMS='cuda': JAX started no backend from that list", 2)),
    (lambda: _raised_in("/site/jax/_src/xla_bridge.py", AssertionError()), "", None),
    (lambda: _raised_in("/work/lost_jax/models/llama.py", AssertionError()), "cuda", None),
])
def test_faults_of_the_machine_are_told_from_bugs(make, platforms, expected, monkeypatch):
  from lost_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  got = main._environment_fault(make())  # pylint: disable=protected-access
  if expected is None:
    assert got is None, got
  else:
    assert got[0].startswith(expected[0]) and got[1] == expected[1], got
    assert "Fix:" in got[0] and "\n" not in got[0]
  # Raised as the cause of another error (a library re-raising it), it is found the same.
  try:
    try:
      raise make()
    except BaseException as inner:  # pylint: disable=broad-except
      raise RuntimeError("while saving") from inner
  except RuntimeError as outer:
    again = main._environment_fault(outer)  # pylint: disable=protected-access
  assert (again is None) == (expected is None), again


# A command line with one fault injected into lost_jax before it runs: `python -c` of this,
# then the CLI's own arguments.
_INJECT = """
import os, signal, sys, time
from lost_jax.training import checkpoint, runtime
kind = sys.argv.pop(1)
if kind == "full_disk":   # the second checkpoint's background write meets a full disk
  save, calls = checkpoint.Checkpointer.save, []
  def full(self, step, *a, **k):
    calls.append(step)
    if len(calls) > 1:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "x" at local file "'
                       + self.directory + f'/{step}.orbax-checkpoint-tmp/state/": No space '
                       "left on device [os_error_code='28']")
    return save(self, step, *a, **k)
  checkpoint.Checkpointer.save = full
else:                     # Ctrl-C while the workdir is opened (start-up)
  class Swallows:         # what a gc callback does: the KeyboardInterrupt is "ignored"
    def __del__(self):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  open_workdir = runtime.open_workdir
  def interrupted(*a, **k):
    if kind == "ctrl_c":
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    Swallows()
    return open_workdir(*a, **k)
  runtime.open_workdir = interrupted
from lost_jax import main
sys.argv[0] = "lost_jax.main"
main.run()
"""


@pytest.mark.slow
def test_a_full_disk_and_ctrl_c_at_start_up_are_one_line_each(tmp_path):
  cases = {"full_disk": ("cannot write checkpoint step 2 in ", "(No space left on device). "
                         "Fix: free space", 1),
           "ctrl_c": ("pretrain interrupted (Ctrl-C) before training began", "", 130),
           "swallowed_ctrl_c": ("pretrain interrupted (Ctrl-C) before training began", "", 130)}

  def run(kind):
    return subprocess.run(
        [sys.executable, "-c", _INJECT, kind, *PRETRAIN, f"--workdir={tmp_path / kind}", *TINY,
         "--config.train.steps=4", "--config.train.ckpt_every=1"], capture_output=True,
        text=True, timeout=300, cwd=ROOT, env=ENV)

  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    procs = dict(zip(cases, pool.map(run, cases)))
  for kind, (head, middle, code) in cases.items():
    proc, out = procs[kind], lines_of(procs[kind])
    assert proc.returncode == code, (kind, proc.returncode, proc.stderr[-3000:])
    errors_ = [line for line in out if line.startswith("error: ")]
    assert errors_ == [out[-1]] and out[-1].startswith(f"error: {head}"), (kind, out)
    assert middle in out[-1] and "Fix:" in out[-1], (kind, out)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, kind
  # The full disk hit step 2: step 1 is finished and kept, the re-run resumes from it.
  assert steps_on_disk(tmp_path / "full_disk") == [1]
  assert sorted(os.listdir(tmp_path / "ctrl_c")) == [".lock"]   # before anything was written
  assert not checkpoint.saved_steps(str(tmp_path / "swallowed_ctrl_c"))   # the loop refused


def test_a_busy_workdir_is_refused_before_the_base_is_read(tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  from helpers import tiny_finetune_config  # pylint: disable=g-import-not-at-top
  from lost_jax.recipes import finetune  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "ft"
  os.makedirs(workdir)
  cfg = tiny_finetune_config(str(tmp_path / "no_such_base"), steps=2)
  with open(workdir / ".lock", "w") as held:   # another process's live run
    held.write("pid 4242 on host elsewhere\n")
    held.flush()
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(errors.UserError, match=r"is in use by a running lost_jax process "
                       r"\(pid 4242 on host elsewhere\)"):
      finetune.finetune_and_evaluate(cfg, str(workdir), quiet=True)
  assert sorted(os.listdir(workdir)) == [".lock"]    # the base was not even looked for


def test_data_the_settings_refuse_is_refused_before_the_workdir_is_written(tmp_path):
  from helpers import tiny_finetune_config  # pylint: disable=g-import-not-at-top
  from lost_jax.recipes import finetune  # pylint: disable=g-import-not-at-top
  cfg = tiny_finetune_config(sparse=False, steps=2)
  cfg.model.n_layers = 4                       # the layers the sparse settings name
  cfg.data.update(dict(max_prompt_len=8, truncate="refuse"))
  workdir = tmp_path / "ft"
  with pytest.raises(errors.UserError, match=r"config\.data\.max_prompt_len=8: \d+ of 600 "
                     "training prompts are longer"):
    finetune.finetune_and_evaluate(cfg, str(workdir), quiet=True)
  assert sorted(os.listdir(workdir)) == [".lock"]    # no config, tokenizer or estimators
  runtime.unlock_workdir(str(workdir))


def test_a_tokenizer_other_than_the_runs_is_refused_before_anything_is_written(
    pretrained_copy, capsys):
  from helpers import base_pretrain_config  # pylint: disable=g-import-not-at-top
  recorded = os.path.join(pretrained_copy, "tokenizer", "tokenizer.json")
  spec = json.load(open(recorded))
  vocab = spec["model"]["vocab"]               # same size, two ids swapped: only content differs
  a, b = [piece for piece, i in vocab.items() if i in (300, 301)]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  with open(recorded, "w") as f:
    json.dump(spec, f)
  config = os.path.join(pretrained_copy, "config.json")
  before = (open(config).read(), os.stat(config).st_mtime_ns)
  cfg = base_pretrain_config()
  cfg.train.steps += 2
  capsys.readouterr()
  with pytest.raises(errors.UserError, match=r"was trained with another tokenizer \(tokenizer"
                     r"\.json in .* differs"):
    pretrain.train_and_evaluate(cfg, pretrained_copy, quiet=True)
  assert (open(config).read(), os.stat(config).st_mtime_ns) == before
  assert capsys.readouterr().out == ""          # no "resuming ..." line before the refusal
  runtime.unlock_workdir(pretrained_copy)


def test_processes_the_command_line_starts_ignore_ctrl_c_from_their_first_lost_jax_import():
  # grain spawns data workers: a terminal's Ctrl-C reaches them too, while they still import
  # JAX, and each printed a traceback. A child of the CLI (LOST_JAX_CLI_PID names its parent)
  # ignores SIGINT as soon as it imports lost_jax; the CLI process itself keeps it.
  probe = "import signal, lost_jax; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
  for cli_pid, ignored in (("1", "True"), (None, "False")):
    env = {k: v for k, v in ENV.items() if k != "LOST_JAX_CLI_PID"}
    if cli_pid:
      env["LOST_JAX_CLI_PID"] = cli_pid
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env=env).stdout.strip()
    assert out == ignored, (cli_pid, out)
  code = ("import os, signal; from lost_jax import errors; errors.catch_sigint(); "
          "import lost_jax; print(os.environ['LOST_JAX_CLI_PID'] == str(os.getpid()), "
          "signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=ENV).stdout.strip()
  assert out == "True False", out
