"""lost_jax.measure.compiled / flops / step_memory against hand counts and hand-written HLO."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import helpers
from lost_jax import configs
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.training import accounting
from lost_jax.measure import compiled, flops, step_memory, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A step as XLA prints it: one sync and one async all-gather, an all-reduce, a reduce-scatter
# inside an async wrapper, an all-to-all, no collective-permute; names and operands that
# merely mention an opcode must not count.
HLO = """
%rs_body (p: f32[16,64]) -> f32[2,64] {
  %p = f32[16,64]{1,0} parameter(0)
  ROOT %reduce-scatter.3 = f32[2,64]{1,0} reduce-scatter(%p), dimensions={0}, to_apply=%add
}
ENTRY %main (a: s32[4,256], b: f32[2,64]) -> f32[64] {
  %all-gather = s32[32,256]{1,0} all-gather(%a), channel_id=2, dimensions={0}
  %all-gather-start.1 = (f32[2,64]{1,0}, f32[16,64]{1,0}) all-gather-start(%b), dimensions={0}
  %all-gather-done.1 = f32[16,64]{1,0} all-gather-done(%all-gather-start.1)
  %weights = f32[2,256]{1,0} all-gather(f32[1,256]{1,0} %w), dimensions={0}
  %all-reduce.7 = f32[64]{0} all-reduce(%x), channel_id=1, to_apply=%region_0
  %async-start = ((f32[16,64]), f32[2,64]) async-start(%all-gather-done.1), calls=%rs_body
  %a2a = f32[16,64]{1,0} all-to-all(%all-gather-done.1), dimensions={0}
  %dot.1 = bf16[16,16]{1,0} dot(%y, %z), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %dot.2 = f32[16,16]{1,0} dot(%y, %z), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %dot.3 = f32[64]{0} dot(%u, %v), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}
"""


def test_tree_bytes_is_shape_times_itemsize():
  tree = {"a": jax.ShapeDtypeStruct((3, 5), jnp.float32), "b": [jnp.zeros((7,), jnp.bfloat16)],
          "c": jax.ShapeDtypeStruct((2, 2, 2), jnp.int8)}
  assert compiled.tree_bytes(tree) == 3 * 5 * 4 + 7 * 2 + 8 * 1


def test_memory_bytes_of_a_tiny_matmul_by_hand():
  a = jax.ShapeDtypeStruct((16, 32), jnp.float32)
  b = jax.ShapeDtypeStruct((32, 8), jnp.bfloat16)
  fn = jax.jit(lambda a, b: a @ b.astype(jnp.float32))
  m = compiled.memory_bytes(fn.lower(a, b).compile())
  assert m["argument"] == 16 * 32 * 4 + 32 * 8 * 2
  assert m["output"] == 16 * 8 * 4 and m["alias"] == 0
  assert m["sum"] == m["argument"] + m["temp"] + m["output"]
  # A donated argument of the output's shape is written in place: all of it aliased.
  donated = jax.jit(lambda a: a * 2.0, donate_argnums=0)
  d = compiled.memory_bytes(donated.lower(a).compile())
  assert d["argument"] == d["output"] == d["alias"] == 16 * 32 * 4
  assert d["sum"] == d["argument"] + d["temp"]


def test_device_total_reads_the_sum_on_cpu_and_the_peak_on_tpu():
  row = dict(sum=10, xla_peak=7)
  assert compiled.device_total(row, "cpu") == 10
  assert compiled.device_total(row, "tpu") == 7


def test_collective_counts_of_hand_written_hlo():
  assert compiled.collective_counts(HLO) == {"all-gather": 3, "all-reduce": 1,
                                             "reduce-scatter": 1, "all-to-all": 1,
                                             "collective-permute": 0}
  assert set(compiled.collective_counts("")) == set(compiled.COLLECTIVES)


def test_dot_dtypes_of_hand_written_hlo():
  assert compiled.dot_dtypes(HLO) == {"bf16": 1, "f32": 2}


def test_batch_all_gathers_finds_only_batch_shaped_results():
  # [32, 256] int32 is a gathered batch of 256-token rows; [2, 256] has too few rows and
  # [16, 64] has no sequence axis.
  assert compiled.batch_all_gathers(HLO, seq_len=256, rows=5) == ["s32[32,256]"]
  assert compiled.batch_all_gathers(HLO, seq_len=256, rows=33) == []


_SHARDED = r"""
import json, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from lost_jax.measure import compiled
mesh = jax.make_mesh((2,), ("x",))
x = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=NamedSharding(mesh, P("x")))
rep = NamedSharding(mesh, P())
fn = jax.jit(lambda a: (a.sum(0), a * 2), out_shardings=(rep, rep))
text = fn.lower(x).compile().as_text()
print("RESULT" + json.dumps([compiled.collective_counts(text),
                             compiled.batch_all_gathers(text, 256, 5)]))
"""


def test_collectives_of_a_compiled_two_device_program():
  # A sum over the sharded axis needs one all-reduce; replicating the sharded array one
  # all-gather of the whole [8, 256] batch.
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts, gathers = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert counts["all-reduce"] == 1 and counts["all-gather"] == 1, counts
  assert counts["reduce-scatter"] == counts["all-to-all"] == 0
  assert gathers == ["s32[8,256]"]


def test_mfu_is_step_flops_over_step_time_over_peak():
  # 6e9 model FLOPs in a 0.5 s step against a 24e9 FLOP/s peak: 12e9 / 24e9.
  assert flops.mfu(6e9, 0.5, 24e9) == pytest.approx(0.5)
  # 1000 tokens in a median step of 0.5 s at 1e6 FLOPs/token against a 4e9 FLOP/s peak.
  stats = flops.step_stats([0.7, 0.5, 0.4], tokens_per_step=1000, flops_per_token=1e6,
                           peak_flops=4e9)
  assert stats["step_s"] == 0.5
  assert stats["tokens_per_s"] == pytest.approx(2000.0)
  assert stats["flops_per_s"] == pytest.approx(2e9)
  assert stats["mfu"] == pytest.approx(0.5)


def test_matmul_flops_and_peak_flops_arithmetic(monkeypatch):
  monkeypatch.setattr(flops, "_median_time", lambda fn, repeats: 0.5)
  assert flops.matmul_flops("float32", n=8, repeats=1) == 2 * 8 ** 3 / 0.5
  # The peak is the best size, measured in the precision's compute dtype.
  seen = []
  monkeypatch.setattr(flops, "matmul_flops",
                      lambda dtype, n, repeats: seen.append(dtype) or float(n))
  assert flops.peak_flops("mixed", sizes=(3, 5, 4)) == 5.0
  assert flops.peak_flops("float32", sizes=(2,)) == 2.0
  assert seen == ["bfloat16"] * 3 + ["float32"]


def _sparselora_model(n_layers=2, d_model=8, ffn_dim=16, n_heads=2, n_kv_heads=1,
                      vocab_size=10):
  cfg = configs.model_config("quickstart")
  cfg.update(dict(vocab_size=vocab_size, d_model=d_model, ffn_dim=ffn_dim, n_layers=n_layers,
                  n_heads=n_heads, n_kv_heads=n_kv_heads))
  return cfg


def test_sparselora_step_flops_matches_hand_count():
  # d=8, FFN 16, 2 query heads / 1 kv head of dim 4, vocab 10, 2 layers; 4 tokens, the last
  # one dense; LoRA r=2; estimator rank 2; layer 1 at FFN 0.5 and attention 0.5.
  cfg = _sparselora_model()
  plan = sl_plan.SparsityPlan((0.0, 0.5), (0.0, 0.5))
  kw = dict(batch=1, seq_len=4, dense_len=1, lora_rank=2, estimator_rank=2)
  dense = flops.sparselora_step_flops(cfg, sl_plan.SparsityPlan.dense(2), **kw)
  sparse = flops.sparselora_step_flops(cfg, plan, **kw)

  # Base kernels q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8: 576 MACs/token;
  # forward + input gradient = 4 FLOPs per MAC.
  dense_layer = 4 * 4 * 576
  # Sparse layer: 2 of 4 kv channels -> q/o keep 4 of 8 (2 query heads share the kv head),
  # k/v keep 2 of 4, FFN keeps 8 of 16: 4*8 + 2*8 + 2*8 + 4*8 + 8*8 + 8*8 + 8*8 = 288 MACs
  # per context token (3 of them), 576 on the dense token.
  sparse_layer = 4 * (1 * 576 + 3 * 288)
  lora = 2 * 6 * 4 * 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8))   # 3 matmul pairs, 2 layers
  attention = 2 * 3 * 2 * 2 * (2 * 4) * (4 * 5 // 2)                # 10 causal pairs
  head = 4 * 4 * 8 * 10
  est_ffn = 2 * 3 * 8 + 2 * (2 * 8 * 2 + 2 * 2 * 16)                # mean; x_bar P Q, twice
  est_attn = sum(2 * 3 * 8 * 2 + 2 * 3 * 2 * 2 + 2 * 2 * 2 * m + 2 * 2 * m for m in (8, 4, 4))
  assert dense == {"base": 2 * dense_layer, "lora": lora, "attention": attention,
                   "head": head, "estimator": 0,
                   "total": 2 * dense_layer + lora + attention + head}
  assert sparse["base"] == dense_layer + sparse_layer == 14976
  assert sparse["estimator"] == est_ffn + est_attn == 792
  assert sparse["total"] == 14976 + lora + attention + head + 792 == 24344

  # Logits on the last token only: past attention the last layer runs that token alone (o,
  # gate, up, down: 64 + 3 * 128 MACs, and o's LoRA), q/k/v on all 4 as before (128 MACs
  # dense, 64 restricted on the 3 context tokens of the sparse plan).
  kw["logits_len"] = 1
  dense_tail = flops.sparselora_step_flops(cfg, sl_plan.SparsityPlan.dense(2), **kw)
  sparse_tail = flops.sparselora_step_flops(cfg, plan, **kw)
  tail_layer = 4 * (4 * 128 + 1 * 448)
  assert dense_tail["base"] == dense_layer + tail_layer
  assert sparse_tail["base"] == dense_layer + 4 * (128 + 3 * 64 + 448)
  lora_o_saved = 2 * 3 * 2 * (4 - 1) * (8 + 8)          # last layer's o adapter on 3 fewer
  assert dense_tail["lora"] == sparse_tail["lora"] == lora - lora_o_saved
  assert dense_tail["head"] == head // 4


TINY = {"model.vocab_size": 256, "model.d_model": 32, "model.ffn_dim": 64,
        "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
        "model.linear.rank": 4, "data.seq_len": 16, "train.batch_size": 4}


def test_measurement_config_sets_micro_batches_and_eight_bit_states():
  cfg = step_memory.measurement_config("quickstart", "lost", microbatch=2, overrides=TINY,
                                       eight_bit=True, remat=True)
  assert (cfg.train.batch_size, cfg.train.microbatches) == (4, 2)
  assert cfg.train.optimizer == "adamw8bit" and cfg.model.remat
  with pytest.raises(ValueError, match="does not divide"):
    step_memory.measurement_config("quickstart", "lost", microbatch=3, overrides=TINY)


@pytest.mark.slow
def test_measure_counts_the_abstract_inputs_exactly():
  cfg = step_memory.measurement_config("quickstart", "full_rank", microbatch=2, overrides=TINY)
  row = step_memory.measure(cfg, compiled.target_devices("cpu"))
  n = accounting.count_params(cfg.model)["total"]
  assert row["params_bytes"] == 4 * n                  # float32 master weights
  assert row["opt_state_bytes"] >= 2 * 4 * n           # two Adam moments
  assert row["static_bytes"] == 0
  assert row["batch_bytes"] == 5 * 4 * 16 * 4          # five int32 / float32 [4, 16] arrays
  held = row["params_bytes"] + row["opt_state_bytes"] + row["batch_bytes"]
  assert held <= row["argument"] <= held + 4096
  assert row["sum"] == row["argument"] + row["temp"] + row["output"] - row["alias"]
  assert sum(row["dots_before"].values()) > 0


def test_interleave_runs_warmup_then_rounds_with_each_runtime_together():
  calls = []

  def runner(name, seconds):
    return lambda steps: calls.append((name, steps)) or [seconds] * steps

  times = timing.interleave({"a": runner("a", 0.1), "b": runner("b", 0.2)}, rounds=2,
                            steps_per_round=3, warmup=1, log=lambda _: None,
                            others={"t": runner("t", 0.3)}, switch_pause_s=0.0)
  assert calls == [("a", 1), ("b", 1), ("t", 1)] + [("a", 3), ("b", 3), ("t", 3)] * 2
  assert times == {"a": [0.1] * 6, "b": [0.2] * 6, "t": [0.3] * 6}


def test_wait_for_quiet_polls_until_the_load_drops_or_time_runs_out(monkeypatch):
  class Clock:
    now = 0.0

    @classmethod
    def time(cls):
      return cls.now

    @classmethod
    def sleep(cls, seconds):
      cls.now += seconds

  monkeypatch.setattr(timing, "time", Clock)
  loads = iter([3.0, 2.8, 1.0])
  monkeypatch.setattr(timing, "load_average", lambda: next(loads))
  assert timing.wait_for_quiet(2.5, 600, poll_s=60, log=lambda _: None) == (True, 1.0)
  assert Clock.now == 120.0                         # two polls of 60 s
  monkeypatch.setattr(timing, "load_average", lambda: 3.0)
  Clock.now = 0.0
  assert timing.wait_for_quiet(2.5, 90, poll_s=60, log=lambda _: None) == (False, 3.0)
  assert Clock.now == 90.0                          # 60 s, then the 30 s left
