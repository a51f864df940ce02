"""One-shot check of lost_jax on a GPU or TPU (under 8 minutes): parity, train-step MFU, SparseLoRA.

1. The layer / model / LoRA / SparseLoRA parity tests (pytest, on the default device, float32
   matmuls at full precision so the tests' float32 tolerances hold).
2. llama_350m-shaped full-rank and LOST train steps in bf16 (`train.precision=mixed`), with
   `model.perf` resolved for the device: median step time, tokens/s and MFU against the chip's
   published bf16 peak (named in the output; the measured bf16 matmul peak is shown beside it).
3. The SparseLoRA benchmark (`experiments.bench_sparselora`, the library's fine-tune step) at a
   LLaMA3-8B-like shape in bf16.
Writes docs/benchmarks/<device>.md.

  python -m experiments.accelerator_check                  # on a GPU / TPU machine
  python -m experiments.accelerator_check --smoke          # tiny shapes, any machine, no file
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import jax

from experiments import bench_sparselora as bench
from experiments import bench_sparselora_report as bench_report
from experiments import common
from experiments import throughput
from lost_jax import configs
from lost_jax.training import accounting
from lost_jax.measure import flops as flops_lib
from lost_jax.adapters.sparselora import plan as sl_plan

PARITY_TESTS = ("tests/test_layers.py", "tests/test_model.py", "tests/test_lora.py",
                "tests/test_sparselora.py")
# Dense bf16 peak FLOP/s per chip from the vendors' data sheets (device_kind substring).
PUBLISHED_BF16_PEAK = (
    ("H200", 989e12, "NVIDIA H200 SXM data sheet, dense BF16"),
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe data sheet, dense BF16"),
    ("H100", 989e12, "NVIDIA H100 SXM data sheet, dense BF16"),
    ("A100", 312e12, "NVIDIA A100 data sheet, dense BF16"),
    ("L4", 121e12, "NVIDIA L4 data sheet, dense BF16"),
    ("TPU v6 lite", 918e12, "Cloud TPU v6e documentation"),
    ("TPU v5 lite", 197e12, "Cloud TPU v5e documentation"),
    ("TPU v5", 459e12, "Cloud TPU v5p documentation"),
    ("TPU v4", 275e12, "Cloud TPU v4 documentation"),
)


def published_peak(device_kind: str) -> tuple[float, str] | None:
  """(bf16 FLOP/s, source) of the first PUBLISHED_BF16_PEAK entry naming this device."""
  for key, flops, source in PUBLISHED_BF16_PEAK:
    if key in device_kind:
      return flops, source
  return None


def device_slug(device) -> str:
  """'NVIDIA H200' -> 'nvidia_h200' (the document's file name)."""
  return re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")


def run_parity(tests, select: str = "") -> dict:
  """pytest on the default device with float32 matmuls at full precision."""
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
  if select:
    cmd += ["-k", select]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:]
  return {"command": " ".join(cmd[2:]), "passed": proc.returncode == 0,
          "summary": tail[0] if tail else proc.stderr.strip()[-300:],
          "seconds": time.perf_counter() - t0}


def time_train_steps(size: str, batch: int, seq_len: int, steps: int, peak: float,
                     overrides: dict | None = None) -> list[dict]:
  """Median step time, tokens/s and MFU of full-rank and LOST bf16 train steps."""
  rows = []
  for method in ("full_rank", "lost"):
    cfg = throughput.bench_config(size, method, "mixed", batch, seq_len, overrides)
    runner = throughput.StepRunner(cfg)
    runner.run(2)                                      # warm-up
    times = runner.run(steps)
    flops = accounting.train_flops_per_token(runner.cfg.model, seq_len)
    rows.append(dict(method=method, compile_s=runner.compile_s, loss=runner.loss,
                     perf=dict(configs.with_resolved_perf(runner.cfg.model).perf),
                     **flops_lib.step_stats(times, batch * seq_len, flops, peak)))
  return rows


def sparselora_setup(smoke: bool):
  """(model config, plan, plan text): LLaMA3-8B with the Math plan; smoke: 2 tiny layers."""
  if smoke:
    cfg = bench.bench_model_config(2, 64, 128, 4, 2, 256, "bfloat16")
    return cfg, sl_plan.SparsityPlan.from_layers(2, 0.75, "1", 0.5, "1"), "FFN 0.75 on 1, " \
        "attention 0.5 on 1"
  cfg = bench.bench_model_config(32, 4096, 14336, 32, 8, 128256, "bfloat16")  # LLaMA3-8B
  plan = sl_plan.SparsityPlan.from_layers(cfg.n_layers, *bench.MATH_FFN, *bench.MATH_ATTN)
  return cfg, plan, "FFN 0.99 on 3-30, attention 0.75 on 14-19,21-23,25-29 (Math)"


def report(result: dict, command: str) -> str:
  dev = result["device"]
  lines = [f"# lost_jax on {dev}", "", common.page_head(command),
           f"jax {jax.__version__} | {result['platform']} | {result['n_devices']} device(s), "
           f"one used | total {result['seconds']:.0f} s", "",
           "## Parity tests on the device", "",
           f"`{result['parity']['command']}` (JAX_DEFAULT_MATMUL_PRECISION=highest): "
           f"**{'passed' if result['parity']['passed'] else 'FAILED'}** — "
           f"{result['parity']['summary']} ({result['parity']['seconds']:.0f} s)", "",
           "## Train steps (bf16 compute, float32 parameters and Adam state)", "",
           f"Shape {result['train_size']}, batch {result['batch']} x {result['seq_len']} tokens, "
           f"{result['steps']} timed steps after 2 warm-up. Peak for MFU: "
           f"{result['peak'] / 1e12:.0f} TFLOP/s ({result['peak_source']}); measured bf16 "
           f"matmul peak {result['measured_peak'] / 1e12:.1f} TFLOP/s.", "",
           "| method | model.perf | median step (s) | tokens/s | MFU | compile (s) | loss |",
           "|---|---|---|---|---|---|---|"]
  for r in result["train"]:
    perf = ", ".join(f"{k}={v}" for k, v in r["perf"].items())
    lines.append(f"| {r['method']} | {perf} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                 f"{r['mfu']:.1%} | {r['compile_s']:.0f} | {r['loss']:.3f} |")
  s = result["sparselora"]
  m = bench_report.summary(s)
  t = s["timings"]
  lines += ["", "## SparseLoRA vs LoRA fine-tune step (LLaMA3-8B shape, bf16)", "",
            f"Shape {result['sl_shape']}; batch 1 x {s['settings']['seq_len']} tokens, last "
            f"{s['settings']['out_len']} with loss; sparsity {result['sl_plan']}; "
            f"{s['settings']['steps']} timed steps per variant, ABBA.",
            "", f"- LoRA median step {t['lora'].median * 1e3:.1f} ms, SparseLoRA "
            f"{t['sparselora'].median * 1e3:.1f} ms: speed-up **{m['speedup']:.2f}x** (FLOP "
            f"ratio {m['flop_ratio']:.2f}x); estimator + selection {m['estimator_share']:.1%} "
            "of the SparseLoRA step."]
  return "\n".join(lines) + "\n"


def run(smoke: bool, log=print) -> dict:
  t0 = time.perf_counter()
  dev = jax.devices()[0]
  out = dict(device=dev.device_kind, platform=dev.platform, n_devices=jax.device_count())
  log(f"device {dev.device_kind} ({dev.platform})")
  out["parity"] = run_parity(("tests/test_model.py",) if smoke else PARITY_TESTS,
                             "logits_from" if smoke else "")
  log(f"parity: {out['parity']['summary']}")
  out["measured_peak"] = flops_lib.peak_flops("mixed", (256,) if smoke else (4096, 8192))
  known = published_peak(dev.device_kind)
  out["peak"], out["peak_source"] = known or (out["measured_peak"], "measured (no published "
                                                                    "figure for this device)")
  size, batch, seq_len, steps = (("quickstart", 2, 32, 3) if smoke else
                                 ("llama_350m", 16, 256, 10))
  # smoke: one layer; it shows that every part runs (compiles dominate on a CPU), not a speed.
  overrides = {"model.n_layers": 1} if smoke else None
  out.update(train_size=size + (" (1 layer)" if smoke else ""), batch=batch, seq_len=seq_len,
             steps=steps)
  out["train"] = time_train_steps(size, batch, seq_len, steps, out["peak"], overrides)
  for r in out["train"]:
    log(f"{r['method']}: {r['step_s']:.4f} s/step, MFU {r['mfu']:.1%}")
  cfg, plan, out["sl_plan"] = sparselora_setup(smoke)
  out["sl_shape"] = (f"{cfg.n_layers} layers, d_model {cfg.d_model}, FFN {cfg.ffn_dim}, "
                     f"{cfg.n_heads} / {cfg.n_kv_heads} heads, vocab {cfg.vocab_size}")
  out["sparselora"] = bench.run_benchmark(
      cfg, plan, seq_len=64 if smoke else 512, out_len=16 if smoke else 128,
      bucket=16 if smoke else 64, warmup=1 if smoke else 3, steps=2 if smoke else 10,
      log=lambda _: None)
  log(f"sparselora speed-up {bench_report.summary(out['sparselora'])['speedup']:.2f}x")
  out["seconds"] = time.perf_counter() - t0
  return out


def _main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  fl = flags.FLAGS
  platform = jax.devices()[0].platform
  out_md = fl.out_md
  if out_md is None:
    out_md = "" if fl.smoke else f"docs/benchmarks/{device_slug(jax.devices()[0])}.md"
  if out_md and (fl.smoke or platform == "cpu"):
    print(f"error: --out_md={out_md!r} would record {'smoke' if fl.smoke else 'CPU'} numbers "
          "as a device document. Fix: run on a GPU/TPU without --smoke, or pass --out_md=''.",
          file=sys.stderr)
    sys.exit(2)
  result = run(fl.smoke)
  text = report(result, common.command_line())
  print(text)
  if out_md:
    os.makedirs(os.path.dirname(out_md) or ".", exist_ok=True)
    with open(out_md, "w") as fh:
      fh.write(text)
  if not result["parity"]["passed"]:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_bool("smoke", False, "Tiny shapes and one parity test (any machine, ~1 min); "
                    "writes no document.")
  flags.DEFINE_string("out_md", None, "Report path (default docs/benchmarks/<device>.md; '' = "
                      "print only).")
  common.code_version_line()   # the code this run starts on
  app.run(_main, flags_parser=common.parse_flags)
