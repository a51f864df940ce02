"""lost_jax.sharding: every method's parameters get an FSDP axis; the compiled step divides
the work over 8 fake devices (ahead-of-time, in a subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import helpers
from lost_jax import configs
from lost_jax.parallel import sharding
from lost_jax.models.llama import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMesh:
  """Just what the rule planner reads: axis sizes."""
  def __init__(self, data=1, fsdp=1, tensor=1):
    self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_rules_place_named_axes_and_give_fsdp_a_dim():
  m = FakeMesh(fsdp=8, tensor=2)
  assert sharding.plan_spec(("embed", "mlp"), (512, 1376), m) == (P("fsdp", "tensor"), [])
  # LOST b (mlp, rank): fsdp takes the free rank dim.
  assert sharding.plan_spec(("mlp", "rank"), (1376, 128), m)[0] == P("tensor", "fsdp")
  # LOST values (None, mlp) with 6 rows: fsdp joins the tensor-sharded dim.
  assert sharding.plan_spec((None, "mlp"), (6, 1376), m)[0] == P(None, ("tensor", "fsdp"))
  # Tiny arrays (norm scales) stay replicated without a note.
  assert sharding.plan_spec(("norm",), (512,), m) == (P(None), [])


def test_an_axis_that_divides_no_named_dim_takes_another_and_the_rest_is_one_line():
  # FFN width 5461 (llama_1b) over tensor=4: tensor joins fsdp on the 2048 dim instead.
  spec, unsplit = sharding.plan_spec(("embed", "mlp"), (2048, 5461), FakeMesh(fsdp=2, tensor=4),
                                     "layers/0/mlp/up/kernel")
  assert spec == P(("fsdp", "tensor"), None) and unsplit == []
  # LOST values (21, 5461) over fsdp=64: no dim divides, so they stay whole. 48 of them are
  # one line per axis, with the count, bytes, examples and the fix.
  mesh = FakeMesh(fsdp=64, tensor=4)
  notes = []
  for layer in range(24):
    for proj in ("gate", "up"):
      spec, why = sharding.plan_spec((None, "mlp"), (21, 5461), mesh,
                                     f"layers/{layer}/mlp/{proj}/values", dtype="float32")
      assert spec == P(None, None) and [n.axis for n in why] == ["tensor", "fsdp"]
      notes += why
  lines = sharding.unsplit_summary(notes)
  mib = 48 * 21 * 5461 * 4 / 2**20
  assert lines == [
      f"sharding: 48 arrays ({mib:.1f} MiB) have no dim that {axis}={size} divides and stay "
      "whole on each of its devices, e.g. layers/0/mlp/gate/values (21, 5461), "
      "layers/0/mlp/up/values (21, 5461), layers/1/mlp/gate/values (21, 5461) and 45 more. "
      f"Fix: make one dim of each a multiple of {size} (their widths: 21, 5461), or accept the "
      "copies." for axis, size in (("tensor", 4), ("fsdp", 64))], lines
  # A smaller size of the axis that splits a dim of every array is named.
  _, why = sharding.plan_spec((None,), (4002,), FakeMesh(fsdp=12), "values")
  assert sharding.unsplit_summary(why) == [
      "sharding: 1 array has no dim that fsdp=12 divides and stays whole on each of its "
      "devices, e.g. values (4002,). Fix: --config.mesh.fsdp=6 --config.mesh.data=-1 splits a "
      "dim of each, or make one dim of each a multiple of 12 (their widths: 4002), or accept "
      "the copies."]
  assert sharding.unsplit_summary([]) == []


def _abstract_params(method, **model):
  cfg = configs.pretrain_config("llama_60m", method)
  cfg.model.update(model)
  configs.apply_precision(cfg)
  model = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  return cfg, params


@pytest.mark.parametrize("method", ["full_rank", "lost", "low_rank", "cola", "sltrain"])
def test_every_parameter_that_is_not_tiny_is_fsdp_sharded(method):
  _, params = _abstract_params(method, n_layers=1)
  mesh = FakeMesh(fsdp=8)
  notes = []
  for path, var in nnx.to_flat_state(params):
    spec, why = sharding.plan_spec(var.get_metadata().get("axes"), var.shape, mesh, str(path))
    notes += why
    flat = [a for ax in spec if ax for a in (ax if isinstance(ax, tuple) else (ax,))]
    if np.prod(var.shape) >= sharding.MIN_FSDP_SIZE and "fsdp" not in flat:
      # Only SLTrain's flat values (round(density n m) long) may miss: then they are named.
      assert method == "sltrain" and path[-1] == "values", (method, path, var.shape, spec)
      assert any(n.name == str(path) and n.axis == "fsdp" for n in notes), notes
  if method != "sltrain":
    assert notes == []


_AOT_SCRIPT = r"""
import json
from experiments import sharding_check
o = {"model.vocab_size": 1024, "model.n_layers": 1, "data.seq_len": 40, "train.batch_size": 128}
rows = sharding_check.run("quickstart", ["full_rank", "lost"], microbatches=2, overrides=o,
                          log=lambda _: None)

# GaLore: the optimizer state does not mirror the parameters (projected moments, projector).
import jax
from flax import nnx
from lost_jax import configs
from lost_jax.models.llama import Llama
from lost_jax.parallel import sharding
from lost_jax.training import optim
cfg = configs.pretrain_config("llama_60m", "galore")
cfg.model.n_layers = 1
cfg.train.galore_rank = 64
configs.apply_precision(cfg)
mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES)
_, params, _ = nnx.split(nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0))),
                         nnx.Param, ...)
param_sh = nnx.as_pure(sharding.state_shardings(params, mesh))
params = nnx.as_pure(params)
opt = jax.eval_shape(optim.make_optimizer(cfg.train, params).init, params)
got = sharding.opt_state_shardings(opt, param_sh, params, mesh)
galore = [[jax.tree_util.keystr(p), list(leaf.shape), str(s.spec)] for (p, leaf), s in zip(
    jax.tree_util.tree_flatten_with_path(opt)[0], jax.tree.leaves(got))]
try:
  sharding.opt_state_shardings({"extra": jax.ShapeDtypeStruct((4, 4), "float32")}, param_sh,
                               params, mesh)
  orphan = "accepted"
except ValueError as e:
  orphan = str(e)
print("RESULT" + json.dumps(dict(rows=rows, galore=galore, orphan=orphan,
                                 embed_spec=str(param_sh["embed"]["embedding"].spec))))
"""


@pytest.mark.slow
def test_compiled_step_with_accumulation_divides_the_work_over_8_devices():
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(8), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  rows = out["rows"]
  by = {(r["method"], r["mesh"]): r for r in rows}
  for method in ("full_rank", "lost"):
    for mesh in ("data=8", "fsdp=8"):
      r = by[(method, mesh)]
      assert r["temp_ratio"] <= 0.25, (method, mesh, r["temp_ratio"])
      assert r["batch_all_gathers"] == [], (method, mesh, r["batch_all_gathers"])
    assert by[(method, "fsdp=8")]["argument_ratio"] <= 0.2, by[(method, "fsdp=8")]
  # GaLore's state: moments and projector sharded over fsdp, counts replicated, and a leaf of
  # no parameter refused.
  proj = [g for g in out["galore"] if "projector" in g[0] and "'up'" in g[0]]
  assert proj and proj[0][1] == [1376, 64] and "fsdp" in proj[0][2], proj
  mu = [g for g in out["galore"] if ".mu" in g[0] and "embedding" in g[0]]
  assert mu and mu[0][2] == out["embed_spec"] != "P()", mu
  big = [g for g in out["galore"] if np.prod(g[1]) >= sharding.MIN_FSDP_SIZE]
  assert big and all("fsdp" in g[2] for g in big), [g for g in big if "fsdp" not in g[2]]
  assert all(g[2] == "P()" for g in out["galore"] if g[1] == [])
  assert "belongs to no parameter" in out["orphan"]


_LOAD_SCRIPT = r"""
import json
import jax, numpy as np
from flax import nnx
from lost_jax import configs
from lost_jax.formats import hf
from lost_jax.recipes import base
from lost_jax.models.llama import Llama
from lost_jax.parallel import sharding
cfg = configs.model_config("quickstart")
cfg.update(vocab_size=256, d_model=64, ffn_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
           dtype="float32")
hf.save_hf_llama(Llama(cfg, rngs=nnx.Rngs(5)), {path!r}, dtype="float32")
whole = hf.load_hf_llama({path!r})                     # no mesh: read whole, one device
mesh_cfg = configs.pretrain_config("quickstart", "full_rank").mesh
mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, 4, 2
mesh = sharding.make_mesh(mesh_cfg)
ft = configs.finetune_config("quickstart")
ft.init.source, ft.init.path = "hf", {path!r}
ft.train.precision = "mixed"
sliced, _ = base.load_base(ft, mesh)                      # mixed: bf16 frozen base on the mesh
out = {{}}
for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(whole, nnx.Param)),
                          nnx.to_flat_state(nnx.state(sliced, nnx.Param))):
  a, b = a.get_value(), b.get_value()
  out["/".join(map(str, p))] = dict(
      spec=str(b.sharding.spec), dtype=str(b.dtype), shard=list(b.sharding.shard_shape(b.shape)),
      max_err=float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))),
      max_abs=float(np.max(np.abs(np.asarray(a, np.float32)))))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_base_loads_slice_by_slice_into_the_mesh_shardings(tmp_path):
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(8), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT.format(path=str(tmp_path))],
                        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  up, o = out["layers/0/mlp/up/kernel"], out["layers/0/attn/o/kernel"]
  assert up["spec"] == "P('fsdp', 'tensor')" and up["shard"] == [16, 48], up   # [64, 96]
  assert o["spec"] == "P('tensor', 'fsdp')" and o["shard"] == [32, 16], o      # transposed
  assert out["embed/embedding"]["spec"] == "P('tensor', 'fsdp')"
  for name, r in out.items():
    assert r["dtype"] == "bfloat16", (name, r)
    # The float32 file's values, rounded once to bf16 (relative error <= 2^-8).
    assert r["max_err"] <= r["max_abs"] * 2 ** -8, (name, r)
    assert r["max_err"] > 0 or r["max_abs"] == 0 or name.endswith("scale"), (name, r)
