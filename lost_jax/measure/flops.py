"""Model FLOPs per step and what share of the device's peak they reach (MFU).

MFU = model FLOPs per step / step time / peak FLOP/s. Per-token training FLOPs of a config
come from `accounting.train_flops_per_token`; `sparselora_step_flops` counts one LoRA /
SparseLoRA fine-tuning step by part; `peak_flops` measures the device's matmul peak.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections

from lost_jax import configs
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora import select as sl_select

LORA_TARGETS = ("q", "k", "v", "o")


def mfu(flops_per_step: float, step_s: float, peak_flops: float) -> float:
  """Model FLOP utilisation: model FLOPs per step / step time / peak FLOP/s."""
  return flops_per_step / step_s / peak_flops


def step_stats(step_times_s: Iterable[float], tokens_per_step: int, flops_per_token: float,
               peak_flops: float) -> dict[str, float]:
  """Median step time, tokens/s, achieved FLOP/s and MFU of a list of timed steps."""
  step = statistics.median(step_times_s)
  tok_s = tokens_per_step / step
  return dict(step_s=step, tokens_per_s=tok_s, flops_per_s=tok_s * flops_per_token,
              mfu=mfu(tokens_per_step * flops_per_token, step, peak_flops))


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_flops(dtype: str, n: int = 2048, repeats: int = 5,
                 accumulate: str | None = "float32") -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] matmul with inputs in `dtype` (median of repeats).

  `accumulate` is the dot's preferred_element_type (None: the input dtype).
  """
  key_a, key_b = jax.random.split(jax.random.key(0))
  a_NxN = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b_NxN = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  acc = None if accumulate is None else jnp.dtype(accumulate)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=acc))
  jax.block_until_ready(matmul(a_NxN, b_NxN))
  return 2 * n ** 3 / _median_time(lambda: matmul(a_NxN, b_NxN), repeats)


def peak_flops(precision: str, sizes: Iterable[int] = (1024, 2048), repeats: int = 5) -> float:
  """The device's matmul peak in a run's compute dtype: best over `sizes` of matmul_flops.

  float32: float32 dots; mixed / pure_bf16: bfloat16 inputs, float32 accumulation.
  """
  compute = configs.PRECISIONS[precision][0]
  return max(matmul_flops(compute, n, repeats) for n in sizes)


def sparselora_step_flops(cfg: ml_collections.ConfigDict, plan: sl_plan.SparsityPlan, *,
                          batch: int, seq_len: int, dense_len: int, lora_rank: int,
                          estimator_rank: int = 8, logits_len: int | None = None,
                          lora_targets=LORA_TARGETS) -> dict[str, int]:
  """Matmul FLOPs of one LoRA / SparseLoRA train step (forward + backward), by part.

  Conventions (2 FLOPs per multiply-add): a frozen base projection costs forward + input
  gradient = 2x its forward; on the first seq_len - dense_len (context) tokens of a sparse
  layer only the kept output columns (q, k, v, gate, up) or input rows (o, down) count. LoRA
  branches are dense on every token: forward + input gradient + two weight gradients = 3x.
  The attention core (QK^T and PV) counts the causal pairs L(L+1)/2 per head, 3x for the
  backward. The LM head (forward + input gradient) runs on the last logits_len positions of
  each sequence (default: all; the loss only needs the output tokens). Past its attention the
  last block runs on those positions only (`model.Llama`): its o and MLP projections (and
  o's LoRA) count logits_len tokens, dense, when its plan keeps them dense. The estimator is
  forward only: the context mean (FFN) or x @ P, its Gram matrix and the column norms
  through Q (attention), for every layer with a non-zero sparsity.
  """
  d, f, h, kv = cfg.d_model, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads
  hd = configs.head_dim(cfg)
  n_tok = batch * seq_len
  n_dense = batch * dense_len
  n_ctx = n_tok - n_dense
  r, e = lora_rank, estimator_rank
  shapes = {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}
  logits_len = seq_len if logits_len is None else logits_len
  last = cfg.n_layers - 1
  sparse_last = n_ctx > 0 and (plan.attn[last] > 0 or plan.ffn[last] > 0)
  tail = batch * logits_len if not sparse_last or logits_len <= dense_len else n_tok
  base = lora = est = 0
  for i in range(cfg.n_layers):
    s_attn, s_ffn = plan.attn[i], plan.ffn[i]
    kept_kv = sl_select.keep_count(kv * hd, s_attn) if s_attn > 0 else kv * hd
    kept = {"q": kept_kv * (h // kv), "k": kept_kv, "v": kept_kv, "o": kept_kv * (h // kv),
            "gate": sl_select.keep_count(f, s_ffn) if s_ffn > 0 else f}
    kept["up"] = kept["down"] = kept["gate"]
    for name, (n, m) in shapes.items():
      full = n * m
      part = kept[name] * (m if name in ("o", "down") else n)
      if i == last and tail < n_tok and name in ("o", "gate", "up", "down"):
        base += 2 * 2 * tail * full
        continue
      base += 2 * 2 * (n_dense * full + n_ctx * part)
    if s_ffn > 0:
      est += 2 * n_ctx * d + 2 * (2 * batch * d * e + 2 * batch * e * f)
    if s_attn > 0:
      for name in ("q", "k", "v"):
        m = shapes[name][1]
        est += 2 * n_ctx * d * e + 2 * n_ctx * e * e + 2 * e * e * m + 2 * e * m
  for name in lora_targets:
    n, m = shapes[name]
    last_tokens = tail if name in ("o", "gate", "up", "down") else n_tok
    lora += ((cfg.n_layers - 1) * n_tok + last_tokens) * 3 * 2 * r * (n + m)
  # Causal (query, key) pairs a layer scores; a local layer only its window's keys.
  window = configs.Arch.of(cfg).sliding_window
  pairs = sum(batch * (seq_len * (seq_len + 1) // 2 if not local else
                       sum(min(q + 1, window) for q in range(seq_len)))
              for local in configs.Arch.of(cfg).local_layers(cfg.n_layers))
  attention = 3 * 2 * 2 * h * hd * pairs
  head = 2 * 2 * batch * logits_len * d * cfg.vocab_size
  return {"base": base, "lora": lora, "attention": attention, "head": head, "estimator": est,
          "total": base + lora + attention + head + est}
