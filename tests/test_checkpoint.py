"""lost_jax.checkpoint: what a resumed run may and may not change."""

import json
import shutil

import numpy as np
import pytest

from helpers import base_pretrain_config, tiny_pretrain_config
from lost_jax import configs
from lost_jax.errors import UserError
from lost_jax.recipes import pretrain
from lost_jax.training import checkpoint, metrics


def _fp(cfg):
  return checkpoint.model_fingerprint(cfg, cfg.model.vocab_size)


def test_settings_that_change_a_runs_meaning_are_refused_and_schedule_changes_listed():
  base = configs.pretrain_config("quickstart", "lost")
  other = configs.pretrain_config("quickstart", "lost")
  other.data.seq_len = 2 * base.data.seq_len
  other.train.batch_size = 2 * base.train.batch_size
  other.data.source, other.data.files = "files", "/data/*.jsonl"
  other.model.linear.sparsity = 0.02
  other.train.lr, other.train.steps = 1e-3, 600
  other.data.worker_count = 4                      # does not change the examples
  other.model.remat = True                          # how the model computes, not what
  other.model.perf.layer_loop = "scan"
  refused, allowed = checkpoint.compare_fingerprints(_fp(base), _fp(other))
  L, B = base.data.seq_len, base.train.batch_size
  assert refused == ["data.files: checkpoint '' vs run '/data/*.jsonl'",
                     f"data.seq_len: checkpoint {L} vs run {2 * L}",
                     "data.source: checkpoint 'stdlib' vs run 'files'",
                     f"global_batch: checkpoint {B} vs run {2 * B}",
                     "model.linear.sparsity: checkpoint 0.01 vs run 0.02",
                     f"seq_len: checkpoint {L} vs run {2 * L}"], refused
  assert allowed == [f"schedule.lr: checkpoint {base.train.lr} vs run 0.001",
                     f"schedule.steps: checkpoint {base.train.steps} vs run 600"], allowed
  assert checkpoint.compare_fingerprints(_fp(base), _fp(base)) == ([], [])
  # A checkpoint of an older version (model, seq_len and vocab only) compares what it has;
  # those versions recorded model.remat, which a resume may change.
  old = {k: _fp(base)[k] for k in ("model", "seq_len", "tokenizer_vocab")}
  old["model"]["remat"] = False
  assert checkpoint.compare_fingerprints(old, _fp(other))[0] == [
      "model.linear.sparsity: checkpoint 0.01 vs run 0.02", f"seq_len: checkpoint {L} vs run {2 * L}"]


def test_a_checkpoint_from_before_a_setting_matches_the_value_that_does_what_it_did():
  base = configs.pretrain_config("quickstart", "full_rank")
  old = _fp(base)
  del old["model"]["linear"]["dense_init"]       # written before model.linear.dense_init
  assert checkpoint.compare_fingerprints(old, _fp(base)) == ([], [])
  base.model.linear.dense_init = "kaiming"
  assert checkpoint.compare_fingerprints(old, _fp(base))[0] == [
      "model.linear.dense_init: checkpoint None vs run 'kaiming'"]
  # A fine-tune's sparse group: the estimator settings default to what came before them; the
  # calibration settings are read by none of those, so any value matches; a setting not in
  # ADDED_SETTINGS is still compared (and a value absent from the run is never matched).
  sparse = {"estimator": "svd", "estimator_tokens": "context", "block_input_grad": False,
            "plan": "", "calibration_batches": 4, "calibration_sparsities": "0.5", "ffn": "0.9@1"}
  saved = {"sparse": {"ffn": "0.9@1"}}
  assert checkpoint.compare_fingerprints(saved, {"sparse": sparse}) == ([], [])
  for key, value in (("estimator", "asvd"), ("block_input_grad", True), ("plan", "p.json")):
    run = {"sparse": dict(sparse, **{key: value})}
    assert checkpoint.compare_fingerprints(saved, run)[0] == [
        f"sparse.{key}: checkpoint None vs run {value!r}"]
  assert checkpoint.compare_fingerprints({"sparse": {"ffn": "0.9@1"}},
                                         {"sparse": {"ffn": "0.5@1"}})[0] == [
      "sparse.ffn: checkpoint '0.9@1' vs run '0.5@1'"]


def test_changed_input_files_are_one_entry_per_input_not_one_per_file():
  base = {f"checkpoints/3/state/d/{i}": f"{100 + i}:abc{i}" for i in range(40)}
  moved = {f"checkpoints/4/state/d/{i}": f"{100 + i}:def{i}" for i in range(40)}
  saved = {"inputs": {"base": base, "data": {"/d/train.json": "10:aa"}}, "seq_len": 32}
  run = {"inputs": {"base": moved, "data": {"/d/train.json": "10:aa"}}, "seq_len": 32}
  refused, allowed = checkpoint.compare_fingerprints(saved, run)
  assert allowed == [] and len(refused) == 1, refused
  assert refused[0] == (
      "inputs.base: 80 file(s) differ from those the checkpoint was trained on "
      "(checkpoints/3/state/d/0: checkpoint '100:abc0' vs run absent; checkpoints/3/state/d/1: "
      "checkpoint '101:abc1' vs run absent; 78 more)")
  run["inputs"]["data"] = {"/d/train.json": "10:bb", "/d/extra.json": "5:cc"}
  run["inputs"]["base"] = base
  assert checkpoint.compare_fingerprints(saved, run)[0] == [
      "inputs.data: 2 file(s) differ from those the checkpoint was trained on (/d/extra.json: "
      "checkpoint absent vs run '5:cc'; /d/train.json: checkpoint '10:aa' vs run '10:bb')"]


@pytest.mark.slow
def test_resume_refuses_a_new_global_batch_and_accepts_a_new_step_count(pretrained_copy, capsys):
  workdir = pretrained_copy      # 60 steps of global batch 8
  bigger = base_pretrain_config()
  bigger.train.batch_size = 16
  with pytest.raises(ValueError, match="global_batch: checkpoint 8 vs run 16"):
    pretrain.train_and_evaluate(bigger, workdir, quiet=True)
  longer = base_pretrain_config()
  longer.train.steps = 62
  assert pretrain.train_and_evaluate(longer, workdir, quiet=True)["step"] == 62
  assert "schedule.steps: checkpoint 60 vs run 62" in capsys.readouterr().out


def _numpy_lr(t: int, length: int, lr: float, warmup_frac: float, min_ratio: float) -> float:
  """Linear warmup over int(warmup_frac * length) steps, cosine to min_ratio * lr at `length`,
  held after it (written out in NumPy, independently of optax)."""
  warmup = max(1, int(warmup_frac * length))
  if t < warmup:
    return lr * t / warmup
  frac = min(t - warmup, length - warmup) / (length - warmup)
  end = lr * min_ratio
  return float(end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac)))


def _lrs(workdir) -> dict[int, float]:
  """{step: lr it trained with}; the row of step k logs the schedule at k - 1."""
  return {r["step"]: r["lr"] for r in metrics.read_metrics(str(workdir)) if "lr" in r}


@pytest.mark.slow
def test_more_steps_stretch_the_schedule_or_hold_its_final_lr(tmp_path, capsys):
  settings = dict(steps=6, batch_size=2, log_every=1, ckpt_every=6, eval_every=100,
                  eval_batches=1, lr=1e-3, warmup_frac=0.34, min_lr_ratio=0.1)
  cfg = lambda **kw: tiny_pretrain_config("full_rank", rank=0, **{**settings, **kw})
  lr = lambda t, length: _numpy_lr(t - 1, length, 1e-3, 0.34, 0.1)
  first = str(tmp_path / "stretch")
  pretrain.train_and_evaluate(cfg(), first, quiet=True)
  second = shutil.copytree(first, str(tmp_path / "constant"))
  assert [_lrs(first)[t] for t in range(1, 7)] == pytest.approx(
      [lr(t, 6) for t in range(1, 7)], rel=1e-5)

  pretrain.train_and_evaluate(cfg(steps=10), first, quiet=True)
  out = capsys.readouterr().out
  assert (f"rebuilt over 10 steps instead of 6, so the lr at the resumed step 6 moves from "
          f"{lr(7, 6):.3e} to {lr(7, 10):.3e}") in out, out
  assert [_lrs(first)[t] for t in range(7, 11)] == pytest.approx(
      [lr(t, 10) for t in range(7, 11)], rel=1e-5)

  pretrain.train_and_evaluate(cfg(steps=10, extend="constant"), second, quiet=True)
  assert "the 6-step schedule is kept" in capsys.readouterr().out
  assert [_lrs(second)[t] for t in range(7, 11)] == pytest.approx([1e-4] * 4, rel=1e-5)
  # The kept length is recorded: a later resume keeps it (not the 10 steps of the last run).
  pretrain.train_and_evaluate(cfg(steps=12, extend="constant"), second, quiet=True)
  assert [_lrs(second)[t] for t in (11, 12)] == pytest.approx([1e-4] * 2, rel=1e-5)
  assert json.load(open(f"{second}/config.json"))["train"]["schedule_steps"] == 6
  # ... until a stretch rebuilds it over the new count.
  pretrain.train_and_evaluate(cfg(steps=14), second, quiet=True)
  assert [_lrs(second)[t] for t in (13, 14)] == pytest.approx(
      [lr(t, 14) for t in (13, 14)], rel=1e-5)

  with pytest.raises(UserError, match="holds a checkpoint of step 14, past "
                     "config.train.steps=8.*lost_jax.main evaluate"):
    pretrain.train_and_evaluate(cfg(steps=8), second, quiet=True)


def test_extend_is_validated():
  cfg = configs.pretrain_config("quickstart", "lost")
  cfg.train.extend = "linear"
  with pytest.raises(UserError, match=r"train.extend: unknown mode 'linear'.*Fix: use one of "
                     r"\('stretch', 'constant'\)"):
    configs.validate(cfg, "pretrain")


def test_another_process_count_reads_the_shared_data_position_or_is_refused(tmp_path):
  """A checkpoint of an older version (no topology in its meta) written by 2 processes: the
  process count comes from its data files; shared data resumes from process 0's position,
  per-process file streams are refused in one line."""
  data = tmp_path / "checkpoints" / "5" / "data"
  data.mkdir(parents=True)
  for i in range(2):
    (data / f"process_{i}-of-2.json").write_text(json.dumps({"position": 40}))
  one = {"processes": 1, "devices": 2, "mesh": {"data": 2, "fsdp": 1, "tensor": 1}}
  meta = {"step": 5, "fingerprint": {}}
  shared = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1, topology=one)
  assert shared.written_on(meta) == {"processes": 2}
  assert shared.resume_note(meta) == (
      "resuming a checkpoint written on 2 processes on 2 devices (data=2) (parameters and "
      "optimizer state re-sharded; the same global batches follow)")
  assert shared._data_state(5) == {"position": 40}   # pylint: disable=protected-access
  assert shared.resume_note(dict(meta, topology=one)) is None
  own = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1, topology=one, shared_data=False)
  # pylint: disable-next=protected-access
  for refuse in (lambda: own.resume_note(meta), lambda: own._data_state(5)):
    with pytest.raises(UserError, match=r"written by 2 process\(es\), each streaming its own "
                       r"data files .* Fix: resume with config.mesh.num_processes=2"):
      refuse()
  assert checkpoint.describe_topology(
      {"processes": 4, "devices": 32, "mesh": {"data": 2, "fsdp": 16, "tensor": 1}}) == \
      "4 processes with 32 devices (data=2, fsdp=16)"


_RESHARD_SCRIPT = r"""
import contextlib, io, json, os, shutil, sys
from lost_jax.training import xla_setup
xla_setup.configure()
import jax
import numpy as np
from helpers import pipeline_config, saved_state
from lost_jax.data import text, tokenizer
from lost_jax.recipes import pretrain
from lost_jax.training import checkpoint, metrics

root = sys.argv[1]
devs = jax.devices()
straight, resumed = os.path.join(root, "straight"), os.path.join(root, "resumed")

def cfg(data, fsdp):
  c = pipeline_config(steps=100, batch_size=8, warmup_frac=0.0, eval_every=1000,
                      keep_checkpoints=10)
  c.model.n_layers = 1      # compiles dominate: one layer per mesh
  c.mesh.update(dict(data=data, fsdp=fsdp))
  return c

def run(c, workdir, stop_at, devices):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    pretrain.train_and_evaluate(c, workdir, quiet=True, stop_at=stop_at, devices=devices)
  return [l for l in out.getvalue().splitlines() if l.startswith("resuming")]

def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}

def host(tree):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype,
          jax.dtypes.prng_key) else x) for x in jax.tree.leaves(tree)]

# A straight run on 8 devices (fsdp=8); its step-2 checkpoint is copied to a second workdir,
# which resumes on 4 devices (data=2, fsdp=2) to step 4, then on 1 device to step 6.
run(cfg(1, 8), straight, 6, devs)
shutil.copytree(straight, resumed)
for step in ("4", "6"):
  shutil.rmtree(os.path.join(resumed, "checkpoints", step))
os.remove(os.path.join(resumed, "metrics.jsonl"))
lines = run(cfg(2, 2), resumed, 4, devs[:4]) + run(cfg(1, 1), resumed, 6, devs[:1])

# Restore the 8-device step-2 checkpoint directly on sub-meshes: state and data position.
c = cfg(1, 8)
tok = tokenizer.load_tokenizer(c.data, c.model.vocab_size)
stream = text.make_train_iterator(c.data, tok, 8, seed=c.seed)
third = [next(stream) for _ in range(3)][2]     # the batch of step 3 in the straight run
_, raw = saved_state(straight, 2)
exact = {}
for data, fsdp, n in ((2, 2, 4), (1, 1, 1)):
  c = cfg(data, fsdp)
  mesh = jax.make_mesh((data, fsdp, 1), ("data", "fsdp", "tensor"), devices=devs[:n])
  setup = pretrain.make_setup(c, mesh)
  ckpt = checkpoint.Checkpointer(straight, every=2, keep=10)
  it = text.make_train_iterator(c.data, tok, 8, seed=c.seed)
  state, _ = ckpt.restore(2, checkpoint.abstract_with_shardings(setup.abstract_state,
                                                                setup.state_shardings),
                          None, it)
  ckpt.close()
  batch = next(it)
  leaves = jax.tree.leaves(state)
  exact[n] = dict(
      state=all(np.array_equal(a, b) for a, b in zip(host(state), host(raw))),
      devices=sorted({len(x.sharding.device_set) for x in leaves}),
      split=sum(x.sharding.shard_shape(x.shape) != x.shape for x in leaves),
      data=all(np.array_equal(batch[k], third[k]) for k in third))
print("RESULT" + json.dumps(dict(lines=lines, straight=losses(straight),
                                 resumed=losses(resumed), exact=exact)))
"""


@pytest.mark.slow
def test_a_checkpoint_of_8_devices_resumes_on_4_and_on_1_device(tmp_path):
  """8 devices (fsdp=8) -> 4 (data=2, fsdp=2) -> 1, in one process with 8 fake devices."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from helpers import ROOT, subprocess_env, xla_flags  # pylint: disable=g-import-not-at-top
  env = subprocess_env(XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _RESHARD_SCRIPT, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT")[-1])
  assert out["lines"] == [
      "resuming a checkpoint written on 8 devices (fsdp=8) on 4 devices (data=2, fsdp=2) "
      "(parameters and optimizer state re-sharded; the same global batches follow)",
      "resuming a checkpoint written on 4 devices (data=2, fsdp=2) on 1 device "
      "(parameters and optimizer state re-sharded; the same global batches follow)"], out
  four, one = out["exact"]["4"], out["exact"]["1"]
  assert four["state"] and four["data"] and four["devices"] == [4] and four["split"] > 0, four
  assert one["state"] and one["data"] and one["devices"] == [1] and one["split"] == 0, one
  straight = {int(k): v for k, v in out["straight"].items()}
  resumed = {int(k): v for k, v in out["resumed"].items()}
  assert sorted(straight) == list(range(1, 7)) and sorted(resumed) == [3, 4, 5, 6]
  # Another mesh reduces in another order: equal to float32 rounding, not bit for bit.
  np.testing.assert_allclose([resumed[s] for s in range(3, 7)],
                             [straight[s] for s in range(3, 7)], rtol=2e-6)
  print("losses 8 devices:", straight, "resumed on 4 then 1:", resumed)
