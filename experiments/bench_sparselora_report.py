"""The page experiments/bench_sparselora.py writes: headline ratios, step-time and FLOP tables."""

from __future__ import annotations

import os
import platform

import jax
import ml_collections
import numpy as np

from experiments import common


def summary(result: dict) -> dict[str, float]:
  """Speedup (ratio of medians, median of per-step ratios), FLOP ratio, estimator share."""
  t = result["timings"]
  pair = np.asarray(t["lora"].seconds) / np.asarray(t["sparselora"].seconds)
  f = result["flops"]
  return {"speedup": t["lora"].median / t["sparselora"].median,
          "pair_speedup": float(np.median(pair)),
          "pair_speedup_q25": float(np.quantile(pair, 0.25)),
          "pair_speedup_q75": float(np.quantile(pair, 0.75)),
          "flop_ratio": f["lora"]["total"] / f["sparselora"]["total"],
          "flop_fraction": f["sparselora"]["total"] / f["lora"]["total"],
          "estimator_share": t["estimator"].median / t["sparselora"].median,
          "estimator_flop_share": f["sparselora"]["estimator"] / f["sparselora"]["total"]}


def record(result: dict, cfg: ml_collections.ConfigDict, plan, plan_text: str, command: str,
           code: dict) -> dict:
  """The JSON beside the page (what experiments/sparselora_accuracy.py reads to put a plan's
  quiet step speedup next to its accuracy): the shape, the per-layer plan, the settings, the
  summary ratios, the medians and the load, and the code it ran on (runs.code_version)."""
  t = result["timings"]
  return {"command": command, "code": code,
          "shape": {k: int(cfg[k]) for k in LLAMA3_8B_SCALED},   # the shape flags,
          "dtype": cfg.dtype, "plan": {"ffn": list(plan.ffn), "attn": list(plan.attn)},
          "plan_text": plan_text, "settings": result["settings"], "summary": summary(result),
          "median_s": {name: t[name].median for name in t},
          "load": [min(result["load"]), max(result["load"])]}


# The default shape (the flags' defaults): LLaMA3-8B's, scaled down to this CPU.
LLAMA3_8B_SCALED = dict(n_layers=32, d_model=1024, ffn_dim=3584, n_heads=8, n_kv_heads=2,
                        vocab_size=32000)


def _shape_note(cfg) -> str:
  """' (LLaMA3-8B shape, scaled down)' for the default dims, '' for any other shape."""
  default = all(getattr(cfg, k) == v for k, v in LLAMA3_8B_SCALED.items())
  return " (LLaMA3-8B shape, scaled down)" if default else ""


def report(result: dict, cfg: ml_collections.ConfigDict, plan_text: str, command: str) -> str:
  """Markdown: settings, step-time table, FLOPs by part, headline ratios."""
  t, f, s = result["timings"], result["flops"], result["settings"]
  m = summary(result)
  dev = jax.devices()[0]
  lines = [
      "# SparseLoRA vs LoRA train-step time",
      "",
      common.page_head(command),
      f"Device: {dev.platform} ({dev.device_kind}, {os.cpu_count()} cores, "
      f"{platform.processor() or platform.machine()}) | jax {jax.__version__} | "
      f"compute dtype {cfg.dtype}, params float32 | 1-min load average while timing "
      f"{min(result['load']):.1f} - {max(result['load']):.1f}"
      + (f" | XLA_FLAGS `{os.environ['XLA_FLAGS']}` (lost_jax.xla_setup)"
         if os.environ.get("XLA_FLAGS") else ""),
      "",
      f"Model: {cfg.n_layers} layers, d_model {cfg.d_model}, FFN {cfg.ffn_dim}, "
      f"{cfg.n_heads} query / {cfg.n_kv_heads} kv heads of dim {cfg.d_model // cfg.n_heads}, "
      f"vocab {cfg.vocab_size}{_shape_note(cfg)}, random weights. LoRA r={s['lora_rank']} "
      f"alpha={s['lora_alpha']:g} on q, k, v, o; base frozen; AdamW on LoRA only.",
      "",
      f"Protocol: synthetic batch {s['batch']} x {s['seq_len']} tokens, last {s['out_len']} "
      f"with loss (dense suffix {s['dense_len']} tokens, context {s['seq_len'] - s['dense_len']}"
      f" sparse); sparsity {plan_text}, on from step 0; {s['warmup']} warm-up + {s['steps']} "
      "timed steps per variant, interleaved ABBA in one process; estimator + selection of all "
      f"{s['sparse_layers']} sparse layers timed alone (jitted) on the same hidden states. "
      + ("LM head on every token (as HF computes it)." if s["logits_len"] == s["seq_len"] else
         f"Both variants run the LM head on the last {s['logits_len']} positions only (every "
         "loss token; context logits would get zero weight)."),
      "",
      "| variant | median step (s) | IQR (s) | min - max (s) | model GFLOP / step |",
      "|---|---|---|---|---|",
  ]
  for name in ("lora", "sparselora"):
    lo, hi = t[name].quantiles()
    lines.append(f"| {name} | {t[name].median:.3f} | {lo:.3f} - {hi:.3f} | "
                 f"{min(t[name].seconds):.3f} - {max(t[name].seconds):.3f} | "
                 f"{f[name]['total'] / 1e9:.1f} |")
  lo, hi = t["estimator"].quantiles()
  lines.append(f"| estimator + selection | {t['estimator'].median * 1e3:.2f} ms | "
               f"{lo * 1e3:.2f} - {hi * 1e3:.2f} ms | {min(t['estimator'].seconds) * 1e3:.2f} - "
               f"{max(t['estimator'].seconds) * 1e3:.2f} ms | "
               f"{f['sparselora']['estimator'] / 1e9:.3f} |")
  lines += [
      "",
      f"- Wall-clock speedup (ratio of medians): **{m['speedup']:.2f}x**; median of per-step "
      f"ratios {m['pair_speedup']:.2f}x (IQR {m['pair_speedup_q25']:.2f} - "
      f"{m['pair_speedup_q75']:.2f}).",
      f"- FLOP ratio LoRA / SparseLoRA: **{m['flop_ratio']:.2f}x** (SparseLoRA = "
      f"{m['flop_fraction']:.0%} of LoRA's FLOPs).",
      f"- Estimator + selection: **{m['estimator_share']:.2%}** of the SparseLoRA step time "
      f"({m['estimator_flop_share']:.3%} of its FLOPs).",
      "",
      "Model FLOPs by part (GFLOP per step, forward + backward; `flops.sparselora_step_flops`):",
      "",
      "| variant | base projections | LoRA | attention core | LM head | estimator | total |",
      "|---|---|---|---|---|---|---|",
  ]
  for name in ("lora", "sparselora"):
    g = {k: v / 1e9 for k, v in f[name].items()}
    lines.append(f"| {name} | {g['base']:.1f} | {g['lora']:.1f} | {g['attention']:.1f} | "
                 f"{g['head']:.1f} | {g['estimator']:.3f} | {g['total']:.1f} |")
  lines += ["", "Timed steps (s) in run order, with the 1-min load average of the 2 cores:", "",
            "| step | lora | sparselora | ratio | estimator (ms) | load |",
            "|---|---|---|---|---|---|"]
  for i, (a, b, e, ld) in enumerate(zip(t["lora"].seconds, t["sparselora"].seconds,
                                        t["estimator"].seconds, result["load"])):
    lines.append(f"| {i + 1} | {a:.3f} | {b:.3f} | {a / b:.2f} | {e * 1e3:.1f} | {ld:.1f} |")
  return "\n".join(lines) + "\n"
