"""mesh.auto (lost_jax/parallel/auto_mesh.py): the mesh and micro-batch it picks divide the
batch, fit the memory figure, and are the most preferred that fit; one-line refusals."""

import pytest

from helpers import run_on_8_cpu_devices, tiny_pretrain_config
from lost_jax import configs
from lost_jax.errors import UserError
from lost_jax.parallel import auto_mesh
from lost_jax.training import accounting, runtime

GIB = 2 ** 30


def _estimate(cfg, c, passes=None):
  trial = configs.pretrain_config(*cfg.name.split(",")) if "," in cfg.name else cfg
  trial.train.microbatches = passes or c.passes
  return accounting.device_memory_estimate(trial, c.data, c.fsdp, c.tensor)["total"]


@pytest.mark.parametrize("size, method, devices, memory_gib", [
    ("llama_7b", "full_rank", 64, 95), ("llama_7b", "lost", 256, 16),
    ("llama_7b", "lost", 8, 16), ("llama_1b", "full_rank", 4, 95),
    ("llama_1b", "full_rank", 256, 16)])
def test_the_choice_divides_the_batch_fits_and_nothing_preferred_fits(size, method, devices,
                                                                      memory_gib):
  cfg = configs.pretrain_config(size, method)
  c, line = auto_mesh.choose(cfg, devices, memory_gib * GIB)
  assert c.data * c.fsdp * c.tensor == devices
  assert cfg.train.batch_size == c.data * c.fsdp * c.passes * c.rows
  budget = auto_mesh.HEADROOM * memory_gib * GIB
  assert c.estimate == _estimate(cfg, c) <= budget
  # Every mesh with fewer passes, or the same passes and a smaller fsdp, is over the budget.
  for fsdp in [f for f in range(1, devices + 1) if devices % (f * c.tensor) == 0]:
    data = devices // (fsdp * c.tensor)
    per_device = cfg.train.batch_size // (data * fsdp)
    for passes in [p for p in range(1, per_device + 1) if per_device % p == 0]:
      if passes < c.passes or (passes == c.passes and fsdp < c.fsdp):
        alt = auto_mesh.Choice(data, fsdp, c.tensor, passes, per_device // passes, 0)
        assert _estimate(cfg, alt) > budget, (fsdp, passes)
  assert line.startswith(f"mesh.auto: data={c.data} fsdp={c.fsdp} tensor={c.tensor} on "
                         f"{devices} devices, {c.rows} sequence")
  assert f"of {memory_gib:.2f} GiB per device" in line and "\n" not in line


def test_apply_sets_the_mesh_and_microbatches():
  cfg = configs.pretrain_config("llama_7b", "lost")
  line = auto_mesh.apply(cfg, 256, 16 * GIB)
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.train.microbatches) == \
      (64, 4, 1, 1), line


def test_nothing_fits_is_one_line_with_a_fix():
  cfg = configs.pretrain_config("llama_7b", "full_rank")
  with pytest.raises(UserError) as e:
    auto_mesh.choose(cfg, 8, 16 * GIB)
  msg = str(e.value)
  assert "\n" not in msg and "no mesh of 8 devices fits" in msg and "Fix:" in msg


def test_a_negative_memory_figure_is_refused_in_one_line():
  cfg = tiny_pretrain_config()
  cfg.mesh.memory_gib = -1.0
  with pytest.raises(UserError) as e:
    configs.validate(cfg, "pretrain")
  assert str(e.value).startswith("config.mesh.memory_gib: -1.0 is not a number in [0, inf)")
  assert "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_a_cpu_device_without_a_memory_figure_is_refused_in_one_line():
  cfg = tiny_pretrain_config(batch_size=8)
  cfg.mesh.auto = True
  with pytest.raises(UserError) as e:
    runtime.resolve_config(cfg, "pretrain")
  assert "reports no memory size" in str(e.value) and "--config.mesh.memory_gib" in str(e.value)


_SCRIPT = """
import json
import jax
from helpers import fixed_batch, run_steps, tiny_pretrain_config
from lost_jax.training import accounting, runtime

out = {}
for memory_gib in (1.0, 0.0015):
  cfg = tiny_pretrain_config("lost", batch_size=16)
  cfg.mesh.auto, cfg.mesh.memory_gib = True, memory_gib
  cfg, mesh = runtime.start(cfg, "pretrain")
  m, t = cfg.mesh, cfg.train
  est = accounting.device_memory_estimate(cfg, m.data, m.fsdp, m.tensor)["total"]
  batch = fixed_batch(t.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
  losses, _ = run_steps(cfg, batch, 1, t.microbatches)
  out[str(memory_gib)] = dict(shape=[m.data, m.fsdp, m.tensor], passes=t.microbatches,
                              mesh=dict(mesh.shape), estimate=est, loss=losses[0])
print("RESULT" + json.dumps(out))
"""


def test_on_8_cpu_devices_the_picked_mesh_builds_and_trains_and_fits_the_figure():
  result = run_on_8_cpu_devices(_SCRIPT)
  roomy, tight = result["1.0"], result["0.0015"]
  # 1 GiB: the tiny model fits replicated, all 16 rows in one pass: pure data parallelism.
  assert roomy["shape"] == [8, 1, 1] and roomy["passes"] == 1
  # 0.0015 GiB (1.61 MB): data=8 needs 2.18 MB and fsdp=2 1.52 MB, over 90% of it (1.45 MB).
  data, fsdp, tensor = tight["shape"]
  assert (data, fsdp, tensor, tight["passes"]) == (2, 4, 1, 1)
  assert 16 % (data * fsdp * tight["passes"]) == 0
  assert tight["estimate"] <= 0.9 * 0.0015 * 2 ** 30
  assert tight["mesh"] == {"data": data, "fsdp": fsdp, "tensor": tensor}
  assert abs(roomy["loss"] - tight["loss"]) < 1e-4     # the same step on another mesh
