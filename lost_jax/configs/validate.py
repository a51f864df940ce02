"""Every check of a run config that needs no JAX: one UserError naming the field and the fix."""

from __future__ import annotations

import math
import os

import ml_collections

from lost_jax.configs.choices import (ACTIVATIONS, ATTENTION_IMPLS, ATTENTIONS, EXTEND_MODES,
                                      FAMILIES, INITS, LAYER_LOOPS, LINEAR_KINDS,
                                      MATMUL_BACKWARDS, MLP_ACTIVATIONS, NORM_SCALES,
                                      OPTIMIZERS, PRECISIONS, ROPE_TYPES, SPARSE_INITS, TEMPLATES,
                                      TRUNCATIONS)
from lost_jax.configs.layer_ranges import parse_layer_sparsity
from lost_jax.configs.schema import Arch, projection_shapes
from lost_jax.errors import UserError


_INF = math.inf


def _fail(field: str, msg: str, fix: str):
  raise UserError(f"config.{field}: {msg}. Fix: {fix}")


def _in_range(field: str, value, lo: float, hi: float, fix: str, *, lo_open: bool = False,
              hi_open: bool = False, integer: bool = False) -> None:
  """Refuse `value` outside the interval lo..hi (open ends as asked), NaN, or a non-integer."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and integer:
    ok = float(value).is_integer()
  if ok:
    ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
  if not ok:
    span = (f"{'(' if lo_open else '['}{lo:g}, "
            f"{hi:g}{')' if hi_open or hi == _INF else ']'}")
    _fail(field, f"{value!r} is not {'an integer' if integer else 'a number'} in {span}", fix)


def validate_mesh(m: ml_collections.ConfigDict) -> None:
  """The multi-process start-up settings (the axis sizes are checked against the devices)."""
  _in_range("mesh.memory_gib", m.get("memory_gib", 0.0), 0.0, _INF, "the memory of one "
            "device in GiB for mesh.auto, e.g. 16, or 0 to read it from the device")
  if "init_timeout_s" in m:
    _in_range("mesh.init_timeout_s", m.init_timeout_s, 1, _INF, "seconds to wait for every "
              "process at start-up, e.g. 300", integer=True)


def validate_train(t: ml_collections.ConfigDict, min_steps: int = 1) -> None:
  """The optimizer, schedule and loop settings shared by pre-training and fine-tuning
  (fine-tuning allows 0 steps: a zero-shot evaluation of the base)."""
  _in_range("train.steps", t.steps, min_steps, _INF, "a positive step count" if min_steps
            else "a step count (0: evaluate the base zero-shot)", integer=True)
  _in_range("train.microbatches", t.microbatches, 1, _INF, "1, or the number of gradient "
            "accumulation passes", integer=True)
  _in_range("train.batch_size", t.batch_size, 1, _INF, "a positive batch size in sequences",
            integer=True)
  if t.batch_size % t.microbatches:
    _fail("train.batch_size", f"{t.batch_size} is not a multiple of train.microbatches="
          f"{t.microbatches}", "make batch_size a multiple of microbatches")
  if t.precision not in PRECISIONS:
    _fail("train.precision", f"unknown precision {t.precision!r}",
          f"use one of {tuple(PRECISIONS)}")
  if t.optimizer not in OPTIMIZERS:
    _fail("train.optimizer", f"unknown optimizer {t.optimizer!r}", f"use one of {OPTIMIZERS}")
  _in_range("train.lr", t.lr, 0.0, _INF, "a positive peak learning rate such as 3e-3",
            lo_open=True)
  _in_range("train.shared_lr", t.get("shared_lr", 0.0), 0.0, _INF, "0 (the embedding, head "
            "and norms train at train.lr) or their own peak learning rate")
  _in_range("train.warmup_frac", t.warmup_frac, 0.0, 1.0, "a fraction of steps such as 0.1")
  _in_range("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, "a fraction of lr such as 0.1")
  if t.get("extend", "stretch") not in EXTEND_MODES:
    _fail("train.extend", f"unknown mode {t.extend!r}", f"use one of {EXTEND_MODES} (what a "
          "resume with more train.steps does to the lr schedule)")
  _in_range("train.b1", t.b1, 0.0, 1.0, "e.g. 0.9", hi_open=True)
  _in_range("train.b2", t.b2, 0.0, 1.0, "e.g. 0.999", hi_open=True)
  _in_range("train.eps", t.eps, 0.0, _INF, "e.g. 1e-8", lo_open=True)
  _in_range("train.weight_decay", t.weight_decay, 0.0, _INF, "0 (none) or e.g. 0.1")
  _in_range("train.clip_norm", t.clip_norm, 0.0, _INF, "0 (no clipping) or e.g. 1.0")
  for name in ("eval_every", "ckpt_every", "log_every", "keep_checkpoints"):
    _in_range(f"train.{name}", t[name], 1, _INF, "a positive integer", integer=True)
  _in_range("train.eval_batches", t.eval_batches, 0, _INF, "a count of batches",
            integer=True)
  _in_range("train.max_skipped_steps", t.get("max_skipped_steps", 1), 1, _INF,
            "the number of consecutive non-finite steps that stops the run, e.g. 10",
            integer=True)
  _in_range("train.peak_flops", t.peak_flops, 0.0, _INF, "0 (no MFU) or the device's peak "
            "FLOP/s")
  if t.optimizer.startswith("galore"):
    _in_range("train.galore_rank", t.galore_rank, 1, _INF, "a positive rank", integer=True)
    _in_range("train.galore_update_freq", t.galore_update_freq, 1, _INF, "e.g. 200",
              integer=True)
    _in_range("train.galore_scale", t.galore_scale, 0.0, _INF, "e.g. 0.25", lo_open=True)


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Raise one clear UserError for an impossible model config, before anything is built."""
  for name in ("vocab_size", "d_model", "ffn_dim", "n_layers", "n_heads", "n_kv_heads"):
    _in_range(f"model.{name}", model[name], 1, _INF, "a positive integer", integer=True)
  for name in ("rope_theta", "norm_eps", "init_std"):
    _in_range(f"model.{name}", model[name], 0.0, _INF, "a positive number", lo_open=True)
  _in_range("model.head_dim", model.get("head_dim", 0), 0, _INF, "0 (d_model // n_heads) or "
            "the per-head width", integer=True)
  if not model.get("head_dim", 0) and model.d_model % model.n_heads:
    _fail("model.n_heads", f"{model.n_heads} heads do not divide d_model={model.d_model}",
          "pick n_heads dividing d_model, or set model.head_dim")
  if model.n_heads % model.n_kv_heads:
    _fail("model.n_kv_heads", f"{model.n_kv_heads} kv heads do not divide "
          f"n_heads={model.n_heads}", "pick n_kv_heads dividing n_heads")
  arch = Arch.of(model)
  if arch.head_dim % 2:
    _fail("model.head_dim", f"head dim {arch.head_dim} is odd", "RoPE needs an even head dim; "
          "change head_dim (or d_model / n_heads)")
  _validate_arch(model, arch)
  perf = model.get("perf")
  if perf is not None:
    for field, value, allowed in (
        ("matmul_backward", perf.matmul_backward, ("auto",) + MATMUL_BACKWARDS),
        ("attention", perf.attention, ("auto",) + ATTENTIONS),
        ("attention_impl", perf.attention_impl, ATTENTION_IMPLS),
        ("layer_loop", perf.get("layer_loop", "auto"), ("auto",) + LAYER_LOOPS)):
      if value not in allowed:
        _fail(f"model.perf.{field}", f"unknown choice {value!r}", f"use one of {allowed}")
    impls = {"splash": ("auto", "pallas", "interpret"),
             "dot_product_attention": ("auto", "xla", "cudnn")}
    if perf.attention in impls and perf.attention_impl not in impls[perf.attention]:
      _fail("model.perf.attention_impl", f"{perf.attention_impl!r} is not an implementation "
            f"of attention={perf.attention!r}", f"use one of {impls[perf.attention]}")
    for field in ("loss_chunk", "loss_vocab_chunk"):
      _in_range(f"model.perf.{field}", perf.get(field, 0), 0, _INF,
                "0 (off) or a positive integer", integer=True)
  rope = model.get("rope_scaling")
  if rope is not None:
    if rope.type not in ROPE_TYPES:
      _fail("model.rope_scaling.type", f"unknown type {rope.type!r}", f"use one of {ROPE_TYPES}")
    if rope.type != "default" and rope.factor <= 0:
      _fail("model.rope_scaling.factor", f"{rope.factor} is not positive", "use e.g. 8.0")
    if rope.type == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
      _fail("model.rope_scaling.high_freq_factor", f"{rope.high_freq_factor} <= "
            f"low_freq_factor={rope.low_freq_factor}", "LLaMA 3.1 uses 4.0 and 1.0")
  lin = model.linear
  if lin.kind not in LINEAR_KINDS:
    _fail("model.linear.kind", f"unknown kind {lin.kind!r}", f"use one of {LINEAR_KINDS}")
  if lin.activation not in ACTIVATIONS:
    _fail("model.linear.activation", f"unknown activation {lin.activation!r}",
          f"use one of {ACTIVATIONS}")
  if lin.init not in INITS:
    _fail("model.linear.init", f"unknown init {lin.init!r}", f"use one of {INITS}")
  if lin.get("dense_init", "normal") not in INITS:
    _fail("model.linear.dense_init", f"unknown init {lin.dense_init!r}", f"use one of {INITS}")
  if lin.factor_init not in ("svd", "random"):
    _fail("model.linear.factor_init", f"unknown factor_init {lin.factor_init!r}",
          "use 'svd' or 'random'")
  if lin.sparse_init not in SPARSE_INITS:
    _fail("model.linear.sparse_init", f"unknown sparse_init {lin.sparse_init!r}",
          f"use one of {SPARSE_INITS}")
  if lin.kind == "dense":
    return
  smallest = min(min(n, m) for _, n, m in projection_shapes(model))
  if not 1 <= lin.rank <= smallest:
    _fail("model.linear.rank", f"rank {lin.rank} is impossible: the smallest projection "
          f"allows 1..{smallest}", f"set model.linear.rank between 1 and {smallest}")
  if lin.kind == "lost":
    if not 0.0 < lin.sparsity <= 1.0:
      _fail("model.linear.sparsity", f"{lin.sparsity} is outside (0, 1]",
            "use a fraction of input channels such as 0.01")
    if not 0.0 <= lin.gamma <= 1.0:
      _fail("model.linear.gamma", f"{lin.gamma} is outside [0, 1]", "use e.g. 0.7")
    if lin.complement_rank < 0:
      _fail("model.linear.complement_rank", f"{lin.complement_rank} < 0",
            "use 0 for all remaining components or a positive count")
  if lin.kind == "sltrain" and not 0.0 < lin.density <= 1.0:
    _fail("model.linear.density", f"{lin.density} is outside (0, 1]", "use e.g. 0.03")


def _validate_arch(model: ml_collections.ConfigDict, arch: Arch) -> None:
  """The architecture settings (schema.ARCH_DEFAULTS) and the attention kernel they need."""
  for field, value, allowed in (("family", arch.family, FAMILIES),
                                ("mlp_activation", arch.mlp_activation, MLP_ACTIVATIONS),
                                ("norm_scale", arch.norm_scale, NORM_SCALES)):
    if value not in allowed:
      _fail(f"model.{field}", f"unknown choice {value!r}", f"use one of {allowed}")
  for field in ("qkv_bias", "qk_norm", "embed_scale", "post_norms"):
    if not isinstance(getattr(arch, field), bool):
      _fail(f"model.{field}", f"{getattr(arch, field)!r} is not a bool", "True or False")
  _in_range("model.sliding_window", arch.sliding_window, 0, _INF, "0 (every layer global) or "
            "the keys a local layer sees, e.g. 4096", integer=True)
  for field in ("rope_local_theta", "query_pre_attn_scalar"):
    _in_range(f"model.{field}", getattr(arch, field), 0.0, _INF, "0 (the default) or a "
              "positive number")
  pattern = arch.attention_pattern
  if not isinstance(pattern, str) or not pattern or set(pattern) - {"L", "G"}:
    _fail("model.attention_pattern", f"{pattern!r} is not a string of L (local) and G "
          "(global) layers", "e.g. 'G' (every layer global), 'L' or 'LLLLLG' (Gemma 3)")
  perf = model.get("perf")
  if any(arch.local_layers(model.n_layers)) and perf is not None and perf.attention == "splash":
    _fail("model.perf.attention", "'splash' does not implement sliding-window (local) layers",
          "set model.perf.attention to blocked or dot_product_attention")


def validate_pretrain(cfg: ml_collections.ConfigDict) -> None:
  """Every pre-training setting that can be checked before JAX starts or data is read."""
  validate_model(cfg.model)
  validate_train(cfg.train)
  validate_mesh(cfg.mesh)
  t = cfg.train
  if t.optimizer.startswith("galore") and cfg.model.linear.kind != "dense":
    _fail("train.optimizer", f"{t.optimizer!r} projects dense gradients",
          "set model.linear.kind='dense' (the galore method preset does)")
  _in_range("data.seq_len", cfg.data.seq_len, 2, _INF, "e.g. 256", integer=True)
  _in_range("train.eval_batches", t.eval_batches, 1, _INF, "e.g. 8", integer=True)
  _in_range("train.eval_tokens", t.eval_tokens, 0, _INF, "0 (eval_batches only) or a token "
            "budget for evaluation", integer=True)


def validate_finetune(cfg: ml_collections.ConfigDict, n_layers: int | None = None) -> None:
  """Fine-tuning settings (train, LoRA, sparsity, data lengths), before the base is loaded.

  With `n_layers` (known once the base is loaded) the layer ranges and ranks are checked
  against the model's shape too.
  """
  validate_train(cfg.train, min_steps=0)
  validate_mesh(cfg.mesh)
  lora = cfg.lora
  targets = [t.strip() for t in str(lora.targets).split(",") if t.strip()]
  names = [name for name, _, _ in projection_shapes(cfg.model)]
  unknown = [t for t in targets if t not in names]
  if not targets or unknown or len(set(targets)) != len(targets):
    _fail("lora.targets", f"{lora.targets!r} is not a non-empty list of distinct projections",
          f"a comma-separated subset of {','.join(names)}, e.g. 'q,k,v,o'")
  _in_range("lora.rank", lora.rank, 1, _INF, "a positive rank such as 8", integer=True)
  _in_range("lora.alpha", lora.alpha, 0.0, _INF, "e.g. 2 x lora.rank", lo_open=True)
  _in_range("lora.dropout", lora.dropout, 0.0, 1.0, "e.g. 0.0 or 0.05", hi_open=True)
  sp = cfg.sparse
  if not isinstance(sp.enabled, bool):
    _fail("sparse.enabled", f"{sp.enabled!r} is not a bool", "True or False")
  for field in ("ffn", "attn"):
    parse_layer_sparsity(sp[field], None, f"sparse.{field}")
  if sp.enabled and cfg.model.get("perf", {}).get("layer_loop") == "scan":
    _fail("model.perf.layer_loop", "'scan' cannot run SparseLoRA's per-layer channel plans "
          "(each layer's static channel counts differ)", "set --config.model.perf.layer_loop="
          "unrolled (or auto), or --config.sparse.enabled=False for plain LoRA")
  _in_range("sparse.estimator_rank", sp.estimator_rank, 1, _INF, "e.g. 8", integer=True)
  _in_range("sparse.start_frac", sp.start_frac, 0.0, 1.0, "a fraction of steps such as 0.05")
  _in_range("sparse.bucket", sp.bucket, 1, _INF, "e.g. 16 or 64", integer=True)
  if sp.get("estimator", "svd") not in ("svd", "asvd"):
    _fail("sparse.estimator", f"{sp.estimator!r} is unknown", "svd or asvd")
  if sp.get("estimator_tokens", "context") not in ("context", "all"):
    _fail("sparse.estimator_tokens", f"{sp.estimator_tokens!r} is unknown", "context or all")
  if not isinstance(sp.get("block_input_grad", False), bool):
    _fail("sparse.block_input_grad", f"{sp.block_input_grad!r} is not a bool", "True or False")
  if sp.get("plan") and not os.path.isfile(sp.plan):
    _fail("sparse.plan", f"{sp.plan!r} is not a file", "give the plan.json `python -m "
          "lost_jax.main calibrate --workdir=DIR` wrote (DIR/plan.json), or '' for sparse.ffn / "
          "sparse.attn")
  _in_range("sparse.calibration_batches", sp.get("calibration_batches", 2), 1, _INF,
            "a few batches, e.g. 2", integer=True)
  parse_sparsity_list(sp.get("calibration_sparsities", "0.5"), "sparse.calibration_sparsities")
  d = cfg.data
  _in_range("data.seq_len", d.seq_len, 2, _INF, "e.g. 512", integer=True)
  _in_range("data.max_prompt_len", d.max_prompt_len, 1, d.seq_len - 1,
            f"a prompt length below data.seq_len={d.seq_len}", integer=True)
  _in_range("data.max_new_tokens", d.max_new_tokens, 1, _INF, "e.g. 64", integer=True)
  if d.template not in TEMPLATES:
    _fail("data.template", f"{d.template!r} is unknown", f"one of {TEMPLATES}")
  if d.get("truncate", "left") not in TRUNCATIONS:
    _fail("data.truncate", f"{d.truncate!r} is unknown", f"one of {TRUNCATIONS}")
  _in_range("train.accuracy_examples", cfg.train.accuracy_examples, 0, _INF,
            "0 (no accuracy) or a count of eval examples", integer=True)
  if n_layers is not None:
    for field in ("ffn", "attn"):
      parse_layer_sparsity(sp[field], n_layers, f"sparse.{field}")
    _check_ranks(cfg, targets)


def parse_sparsity_list(text: str, field: str) -> tuple[float, ...]:
  """'0.5,0.9' -> (0.5, 0.9): distinct sparsities in (0, 1), sorted (UserError if not)."""
  try:
    values = tuple(sorted({float(v) for v in str(text).split(",") if v.strip()}))
  except ValueError:
    values = ()
  if not values or not all(0.0 < v < 1.0 for v in values):
    _fail(field, f"{text!r} is not a list of sparsities in (0, 1)", "e.g. '0.5,0.7,0.9'")
  return values


def validate_finetune_base(cfg: ml_collections.ConfigDict) -> None:
  """The checks that need the base's shape (cfg.model read from the base): the model itself,
  the sparsity layer ranges and the LoRA / estimator ranks against its projections."""
  validate_model(cfg.model)
  for field in ("ffn", "attn"):
    parse_layer_sparsity(cfg.sparse[field], cfg.model.n_layers, f"sparse.{field}")
  _check_ranks(cfg, [t.strip() for t in str(cfg.lora.targets).split(",") if t.strip()])


def _check_ranks(cfg: ml_collections.ConfigDict, targets: list[str]) -> None:
  lora, sp = cfg.lora, cfg.sparse
  smallest = min(min(n, m) for name, n, m in projection_shapes(cfg.model) if name in targets)
  _in_range("lora.rank", lora.rank, 1, smallest, f"at most {smallest}, the smallest targeted "
            "projection's dimension", integer=True)
  smallest_all = min(min(n, m) for _, n, m in projection_shapes(cfg.model))
  _in_range("sparse.estimator_rank", sp.estimator_rank, 1, smallest_all,
            f"at most {smallest_all}, the smallest projection's dimension", integer=True)
