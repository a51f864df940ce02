"""experiments/memory.py and memory_report.py: AOT-compiled step memory of a tiny model."""

import pytest

from experiments import memory, memory_report
from lost_jax.training import accounting
from lost_jax.measure import compiled, step_memory

# A 2-layer model with a large vocab, so LOST's smaller projections show in the arguments.
TINY = {"model.vocab_size": 512, "model.d_model": 64, "model.ffn_dim": 192,
        "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 4,
        "model.linear.rank": 8, "data.seq_len": 32, "train.batch_size": 8}


@pytest.fixture(scope="module")
def rows():
  return memory.run(["quickstart"], ["full_rank", "lost"], microbatch=4, overrides=TINY,
                    log=lambda _: None)


@pytest.mark.slow
def test_arguments_are_exactly_state_indices_and_batch(rows):
  for r in rows:
    cfg = step_memory.measurement_config("quickstart", r["method"], microbatch=4, overrides=TINY)
    n = accounting.count_params(cfg.model)
    assert r["params_bytes"] == 4 * n["total"]                        # float32 master weights
    assert r["opt_state_bytes"] >= 2 * 4 * n["trainable"]             # two Adam moments
    assert r["static_bytes"] == 4 * n["static_indices"]
    assert r["batch_bytes"] == 8 * 32 * 4 * 5
    held = r["params_bytes"] + r["opt_state_bytes"] + r["static_bytes"] + r["batch_bytes"]
    assert held <= r["argument"] <= held + 4096, (r["method"], held, r["argument"])
    # Donation: the new state reuses the old state's buffers.
    assert r["alias"] >= r["params_bytes"] + r["opt_state_bytes"]
    assert r["total"] == r["argument"] + r["temp"] + r["output"] - r["alias"]
    # Temporaries hold at least the float32 accumulation buffer and one pass's gradients.
    assert r["temp"] >= 2 * r["params_bytes"]


@pytest.mark.slow
def test_rows_compare_methods(rows):
  full, lost = rows
  assert (full["method"], lost["method"]) == ("full_rank", "lost")
  assert (full["microbatch"], full["microbatches"]) == (4, 2)
  assert full["ratio"] == 1.0
  assert lost["static_bytes"] > 0 == full["static_bytes"]
  assert lost["params_bytes"] < full["params_bytes"]
  assert lost["argument"] < full["argument"]
  assert lost["ratio"] == pytest.approx(lost["total"] / full["total"])
  assert lost["estimate_ratio"] == pytest.approx(lost["estimate"]["total"]
                                                 / full["estimate"]["total"])


@pytest.mark.slow
def test_report_files(rows, tmp_path):
  md, png = tmp_path / "memory.md", tmp_path / "memory.png"
  memory_report.write_markdown(rows, str(md), "python -m experiments.memory --sizes=quickstart")
  memory_report.plot(rows, str(png))
  text = md.read_text()
  assert "| quickstart | lost |" in text and "--sizes=quickstart" in text
  assert f"LOST total = {rows[1]['ratio']:.2f} x full-rank" in text
  # The quantity behind "total" and the performance settings compiled are named.
  assert "**total = arguments + temp + output - alias**" in text
  assert "matmul backward cpu_transposed, attention blocked" in text
  assert "layer loop unrolled" in text and "**temp** = XLA's temporaries" in text
  assert png.stat().st_size > 10_000


def test_tpu_target_traces_the_tpu_path():
  # memory.run resolves model.perf for the target: a TPU step has no CPU transposes/barriers
  # and runs jax's Pallas splash kernel (traced here for CPU devices, not lowered: the TPU
  # kernel lowers only for a TPU; `--platform=tpu` compiles it with libtpu).
  import jax  # pylint: disable=g-import-not-at-top
  from lost_jax import configs
  from lost_jax.parallel import sharding
  from lost_jax.recipes import pretrain  # pylint: disable=g-import-not-at-top
  from lost_jax.training import steps  # pylint: disable=g-import-not-at-top
  texts = {}
  for platform in ("cpu", "tpu"):
    cfg = step_memory.measurement_config("quickstart", "lost", microbatch=4, overrides=TINY)
    configs.resolve_perf(cfg.model, platform)
    setup = pretrain.make_setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    step = steps.make_train_step(setup, cfg.train.microbatches)
    texts[platform] = str(step.trace(*step_memory.abstract_inputs(setup, cfg)).jaxpr)
  assert "optimization_barrier" in texts["cpu"] and "pallas_call" not in texts["cpu"]
  assert "optimization_barrier" not in texts["tpu"] and "pallas_call" in texts["tpu"]


def test_bad_microbatch_is_rejected():
  with pytest.raises(ValueError, match="does not divide"):
    step_memory.measurement_config("quickstart", "lost", microbatch=5, overrides=TINY)


def test_target_lines_read_micro_batches_and_remat():
  row = lambda size, mb, ratio, remat=False: dict(size=size, method="lost", microbatch=mb,
                                                  ratio=ratio, remat=remat)
  rows = [row("llama_1b", 8, 0.60), row("llama_7b", 4, 0.51)]
  swept = [row("llama_1b", 1, 0.50), row("llama_1b", 16, 0.70)]
  remat = [row("llama_1b", 8, 0.53, remat=True), row("llama_1b", 1, 0.40, remat=True)]
  one_b, seven_b = memory_report.target_lines(rows, swept, 0.55, remat_rows=remat)
  assert one_b.startswith("llama_1b: target LOST <= 0.55 x full-rank not met at the default "
                          "micro-batch 8 (0.60 x)")
  assert "by micro-batch 1: 0.50, 8: 0.60, 16: 0.70 -> met up to micro-batch 1" in one_b
  assert one_b.endswith("with model.remat at micro-batch 8: 0.53 x -> met")
  assert seven_b == ("llama_7b: target LOST <= 0.55 x full-rank met at the default "
                     "micro-batch 4 (0.51 x)")


@pytest.mark.slow
def test_8bit_rows_hold_the_accounted_state_and_the_low_bit_page(rows, tmp_path):
  rows8 = memory.run(["quickstart"], ["full_rank"], microbatch=4, overrides=TINY,
                     eight_bit=True, log=lambda _: None)
  r = rows8[0]
  cfg = step_memory.measurement_config("quickstart", "full_rank", microbatch=4,
                                       overrides=TINY, eight_bit=True)
  assert r["optimizer"] == cfg.train.optimizer == "adamw8bit"
  # Beyond the accounting: float32 scalars only (step counters, the unused scale of each
  # unquantised moment: 5 norm scales x 2 moments).
  assert 0 <= r["opt_state_bytes"] - accounting.optimizer_state_bytes(cfg) <= 4 * (2 * 5 + 4)
  rows32 = [row for row in rows if row["method"] == "full_rank"]   # the same 32-bit run
  assert r["opt_state_bytes"] < 0.5 * rows32[0]["opt_state_bytes"]
  path = tmp_path / "low_bit.md"
  memory_report.write_low_bit_markdown(str(path), "cmd", rows32, rows8, [])
  text = path.read_text()
  assert "adamw8bit" in text and "```\ncmd\n```" in text and "Code version: commit" in text


def test_loop_table_pairs_the_two_layer_loops():
  row = lambda method, loop, total: dict(size="llama_1b", method=method, microbatch=8,
                                         remat=False, perf=dict(layer_loop=loop),
                                         argument=2 * compiled.GIB, temp=total * compiled.GIB,
                                         total=total * compiled.GIB, compile_s=12.0)
  table = memory_report.loop_table([row("lost", "unrolled", 10),
                                    row("full_rank", "unrolled", 20), row("lost", "scan", 12)])
  lines = table.splitlines()
  assert len(lines) == 4           # header, rule, and lost's pair only (full_rank is unpaired)
  assert lines[2] == "| llama_1b | lost | 8 | no | unrolled | 2.00 | 10.00 | **10.00** | 1.00 | 12 |"
  assert lines[3] == "| llama_1b | lost | 8 | no | scan | 2.00 | 12.00 | **12.00** | 1.20 | 12 |"


@pytest.mark.slow
def test_nf4_base_rows_match_the_accounting_and_the_low_bit_page(tmp_path):
  devices = compiled.target_devices("cpu")
  rows = []
  for quantize in ("none", "nf4"):
    cfg = step_memory.finetune_memory_config("quickstart", quantize)
    rows.append(step_memory.measure_finetune(cfg, devices))
  bf16, nf4 = rows
  assert nf4["base_estimate"] < bf16["base_estimate"]
  # The frozen arguments differ by exactly what the accounting says NF4 saves (estimators
  # and everything else frozen are the same in both).
  assert (bf16["static_bytes"] - nf4["static_bytes"]
          == bf16["base_estimate"] - nf4["base_estimate"])
  assert nf4["sum"] < bf16["sum"]
  path = tmp_path / "low_bit.md"
  memory_report.write_low_bit_markdown(str(path), "cmd", [], [], rows)
  text = path.read_text()
  assert "| quickstart | nf4 |" in text and f"**{nf4['sum'] / bf16['sum']:.2f}** |" in text
  assert f"({nf4['sum'] / bf16['sum']:.2f} x)" in text


@pytest.mark.slow
def test_fused_loss_never_holds_the_whole_logits(tmp_path):
  # One micro-batch of 4 x 128 tokens at vocab 8192: the plain loss keeps [512, 8192] float32
  # logits (16 MiB) and their gradient; the fused loss (chunks of 32 positions) keeps a
  # quarter-size block, so its temporaries are at least one logits-size smaller.
  # overrides as the command line passes them (--layer_loop) reach every chunk's compile.
  rows = memory.loss_rows("quickstart", ["full_rank"], [0, 32], vocab=8192, batch=4,
                          seq_len=128, log=lambda _: None,
                          overrides={"model.perf.layer_loop": "scan"})
  plain, fused = rows
  logits = 4 * 128 * 8192 * 4
  assert (plain["loss_chunk"], fused["loss_chunk"]) == (0, 32)
  assert plain["perf"]["layer_loop"] == fused["perf"]["layer_loop"] == "scan"
  assert plain["argument"] == fused["argument"]
  assert plain["temp"] - fused["temp"] >= logits, (plain["temp"], fused["temp"])
  path = tmp_path / "loss.md"
  memory_report.write_loss_markdown(str(path), "python -m experiments.memory --loss_md=x", rows)
  text = path.read_text()
  assert "--loss_md=x" in text and "fused, chunks of 32 positions x 4 rows" in text
  assert f"**{fused['total'] / plain['total']:.2f}**" in text
