"""experiments/pod_scale.py without a TPU: the plan, the micro-batch sizes, the compiler's
out-of-HBM message, the per-step arithmetic, the page and --help."""

import json
import re
import subprocess
import sys

import pytest

from experiments import pod_scale, pod_scale_report
from helpers import ROOT, subprocess_env
from lost_jax import configs
from lost_jax.training import accounting


def test_the_plan_measures_7b_at_64_and_256_chips_first():
  rows = pod_scale.plan()
  first = {(r.slice, r.method) for r in rows[:4]}
  assert first == {(s, m) for s in ("v5p-128", "v5e-256") for m in ("full_rank", "lost")}
  assert all(r.size == "llama_7b" and r.mesh == "fsdp" and r.bits == 32 for r in rows[:4])
  assert len({r.key for r in rows}) == len(rows) == 2 * 2 * 2 * 3 * 4 + 4
  # After the 7B 32-bit rows of every mesh at 64 and 256 chips: pure FSDP with unrolled layers.
  assert {(r.slice, r.method, r.mesh, r.bits, r.loop) for r in rows[20:24]} == {
      (s, m, "fsdp", 32, "unrolled") for s in ("v5p-128", "v5e-256") for m in pod_scale.METHODS}
  assert rows[20].key.endswith("|unrolled") and rows[20].compile_key(8).endswith("|unrolled")
  assert [(r.slice, r.mesh) for r in rows[8:10]] == [("v5p-128", pod_scale.AUTO)] * 2
  assert all(r.chips == {"v5p-8": 4, "v5p-128": 64, "v5e-256": 256}[r.slice] for r in rows)


@pytest.mark.parametrize("slice_, mesh, sizes", [
    ("v5e-256", "fsdp", [1, 2]), ("v5p-128", "fsdp", [1, 2, 4, 8]),
    ("v5e-256", "fsdp x tensor", [1, 2, 4, 8]), ("v5p-8", "data x fsdp", [1, 2, 4, 8, 16, 32, 64, 128])])
def test_micro_batches_divide_the_global_batch_over_the_batch_shards(slice_, mesh, sizes):
  row = pod_scale.Row(slice_, "llama_7b", "lost", 32, mesh)
  assert pod_scale.micro_batches(row) == sizes
  data, fsdp, _ = row.shape
  for r in sizes:
    cfg = pod_scale.row_config(row, r)
    assert cfg.train.batch_size == 512 and cfg.train.microbatches * r * data * fsdp == 512
    assert cfg.model.perf.layer_loop == "scan" and cfg.model.perf.attention == "splash"


def test_a_mesh_auto_row_compiles_the_pick_once_and_shares_a_named_meshs_compile():
  row = pod_scale.Row("v5e-256", "llama_7b", "full_rank", 32, pod_scale.AUTO)
  c = row.auto_choice()
  assert row.shape == (c.data, c.fsdp, c.tensor) and pod_scale.micro_batches(row) == [c.rows]
  assert row.chips == 256
  named = pod_scale.Row("v5e-256", "llama_7b", "full_rank", 32, "data x fsdp")
  assert (row.compile_key(2) == named.compile_key(2)) == (row.shape == named.shape)


def test_eight_bit_rows_use_the_8bit_optimizer():
  row = pod_scale.Row("v5p-128", "llama_1b", "full_rank", 8, "fsdp")
  assert pod_scale.row_config(row, 8).train.optimizer == "adamw8bit"


def test_oom_bytes_reads_the_compilers_refusal():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
         "space hbm. Used 120.50G of 95.74G hbm. Exceeded hbm capacity by 24.76G.")
  used, have = pod_scale.oom_bytes(msg)
  assert used == pytest.approx(120.5 * 2 ** 30) and have == pytest.approx(95.74 * 2 ** 30)
  assert pod_scale.oom_bytes("INTERNAL: RET_CHECK failure") is None


def _measurement(flops_w, bytes_w, ici_w, seconds_w, seconds_once, optimal):
  hlo = lambda f, b, i, s: dict(flops=f, bytes=b, ici_bytes=i, seconds=s, unknown_loops=0,
                                collective_count=dict.fromkeys(pod_scale.hlo.COLLECTIVES, 1.0),
                                collective_bytes=dict.fromkeys(pod_scale.hlo.COLLECTIVES,
                                                               2.0 ** 30))
  return dict(rows_per_chip=2, microbatches=1, hlo=hlo(flops_w, bytes_w, ici_w, seconds_w),
              hlo_once=hlo(flops_w / 32, bytes_w / 32, ici_w / 32, seconds_once),
              compiler={"flops": flops_w / 32, "bytes accessed": bytes_w / 32,
                        "optimal_seconds": optimal})


def test_estimates_scale_the_compilers_time_by_the_loops_and_compute_mfu_by_hand():
  row = pod_scale.Row("v5e-256", "llama_7b", "lost", 32, "fsdp")
  m = _measurement(flops_w=4e12, bytes_w=1e11, ici_w=2e10, seconds_w=0.5, seconds_once=0.02,
                   optimal=0.03)
  e = pod_scale.estimates(row, m)
  step = 0.03 * 0.5 / 0.02                                  # 0.75 s
  model = configs.pretrain_config("llama_7b", "lost").model
  flops = accounting.train_flops_per_token(model, 256) * 512 * 256 / 256   # 8.7e12 > 4e12
  assert e["step_s"] == pytest.approx(step)
  assert e["tokens_per_s"] == pytest.approx(512 * 256 / step)
  assert e["mfu"] == pytest.approx(flops / step / 197e12)
  # Compute from the model's FLOPs (the HLO's miss the attention kernel's), HBM, ICI.
  assert (e["compute_s"], e["hbm_s"], e["ici_s"]) == pytest.approx((flops / 197e12,
                                                                    1e11 / 819e9, 2e10 / 400e9))
  assert e["roofline_s"] == pytest.approx(1e11 / 819e9)      # HBM-bound here
  assert e["hlo_step_s"] == 0.5 and e["hlo_mfu"] == pytest.approx(flops / 0.5 / 197e12)
  assert e["flops_check"] == pytest.approx(1.0) and e["bytes_check"] == pytest.approx(1.0)
  # A negative optimal_seconds (the compiler's, on v5e) gives no compiler estimate.
  none = pod_scale.estimates(row, dict(m, compiler=dict(m["compiler"], optimal_seconds=-15.0)))
  assert none["step_s"] is none["tokens_per_s"] is none["mfu"] is None


def _row(method, peak, optimal):
  row = pod_scale.Row("v5p-128", "llama_7b", method, 32, "fsdp")
  m = _measurement(4e13, 1e11, 2e10, 0.5, 0.02, optimal)
  return dict(m, key=row.key, slice=row.slice, size=row.size, method=method, bits=32,
              mesh="fsdp", chips=64, shape=row.shape, chip="TPU v5p", hbm_gib=95,
              max_rows_per_chip=8, largest_fit=8, largest_known=True, tried={},
              argument=2 ** 30, temp=2 ** 31, peak=peak, fits=True, compile_s=100.0,
              estimate=dict(total=peak, activations=peak / 2), version="Code version: commit 0123456789, lost_jax "
              "sources 1.")


def test_the_page_has_its_head_tables_and_a_computed_closing_note():
  cache = {"compiles": {}, "rows": {}}
  # The compiler's 0.08 / 0.04 s with bodies once, x 0.5 / 0.02 for the loops: 2 s and 1 s.
  for r in (_row("full_rank", 30 * 2 ** 30, 0.08), _row("lost", 12 * 2 ** 30, 0.04)):
    cache["rows"][r["key"]] = r
  text = pod_scale_report.markdown(cache, "python -m experiments.pod_scale --out_md=x.md")
  assert "Code version: commit 0123456789" in text and "python -m experiments.pod_scale" in text
  note = pod_scale_report.summary_lines(cache)
  assert len(note) == 1
  mfu = {m: accounting.train_flops_per_token(configs.pretrain_config("llama_7b", m).model, 256)
         * 512 * 256 / 64 / step / 459e12 for m, step in (("full_rank", 2.0), ("lost", 1.0))}
  assert "30.00 GiB vs LOST 12.00 GiB (0.40x)" in note[0]
  assert f"MFU {100 * mfu['full_rank']:.1f}% vs {100 * mfu['lost']:.1f}%" in note[0]
  assert "step 2.000 vs 1.000 s (0.50x)" in note[0]
  assert "Activations are 50% (full-rank) and 50% (LOST)" in note[0]
  assert "| v5p-128 | llama_7b | 32-bit | fsdp=64 | 30.00 / 12.00 | 0.40 |" in text


def test_the_readme_quotes_the_committed_page():
  """README's pod-slice table: each row's peaks and collective bytes are the page's LOST
  against full-rank row, its MFU figures the page's computed closing note, of one commit."""
  with open(f"{ROOT}/README.md", encoding="utf-8") as f:
    readme = f.read()
  cache = json.load(open(f"{ROOT}/docs/benchmarks/pod_scale.json", encoding="utf-8"))
  page = pod_scale_report.markdown(cache, "python -m experiments.pod_scale")
  note = " ".join(pod_scale_report.summary_lines(cache))
  rows = re.findall(r"^\| (v5[pe]-\d+), fsdp=(\d+) \| ([\d.]+) / ([\d.]+) \(of (\d+)\) \| "
                    r"([\d.]+) / ([\d.]+) \| ([\d.]+)% / ([\d.]+)% ", readme, re.M)
  assert len(rows) == 2, rows
  for slice_, fsdp, p_full, p_lost, hbm, c_full, c_lost, m_full, m_lost in rows:
    assert (f"| {slice_} | llama_7b | 32-bit | fsdp={fsdp} | {p_full} / {p_lost} |" in page
            and f"| {c_full} / {c_lost} |" in page), slice_
    assert f"of {hbm} GiB HBM" in note and f"MFU {m_full}% vs {m_lost}%" in note, slice_
  commit = re.search(r"Code version: commit (\w{7})", page).group(1)
  assert f"commit {commit}" in readme


def test_help_exits_0_and_names_the_flags():
  proc = subprocess.run([sys.executable, "-m", "experiments.pod_scale", "--help"], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "--slices" in proc.stdout and "--out_json" in proc.stdout
