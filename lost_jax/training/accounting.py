"""Parameter, FLOP and training-memory accounting from configs alone (pure Python, no JAX).

`python -m lost_jax.training.accounting --config=configs/pretrain.py:llama_1b,lost [--compare]`
prints a table; the functions below are what the trainer (MFU) and the tests use.

Conventions, stated once:
- FLOPs count multiply-adds as 2 and only matrix products (elementwise ops, norms, RoPE,
  softmax and the embedding gather are free). Attention is counted as full, not causal:
  QK^T and AV cost 2 * 2 * seq_len * (H * hd) per token per layer, as in PaLM / MaxText
  (train = 6N + attention). Training = 3 x forward (forward + backward).
- SLTrain's layer materialises its dense kernel A @ B^T * alpha/r + S once per forward and then
  runs a dense matmul, so it is counted as 2nm per token; the merge (2nmr per layer per step)
  is amortised over the batch and is not a per-token cost.
- Memory is for one replica holding the whole model (no sharding), in bytes.
"""

from __future__ import annotations

import math

import ml_collections

from lost_jax import configs, usage
from lost_jax.ops.quant import STATE_BLOCK
from lost_jax.training.optim import MIN_8BIT_SIZE

# train.precision -> (bytes per parameter / gradient / optimizer-state entry, bytes per
# activation entry). Mirrors lost_jax.train.PRECISIONS (mixed: f32 params, bf16 compute).
PRECISION_BYTES = {"mixed": (4, 2), "pure_bf16": (2, 2), "float32": (4, 4)}
INDEX_BYTES = 4          # StaticIndices are int32.
FLOAT32_BYTES = 4        # softmax probabilities and logits are always float32.


def sltrain_nnz(n: int, m: int, density: float) -> int:
  """Size of SLTrain's fixed support in an [n, m] kernel (as layers.sltrain_support)."""
  return max(1, round(density * n * m))


def _check_kind(kind: str):
  if kind not in configs.LINEAR_KINDS:
    raise ValueError(f"linear kind {kind!r} is unknown. Fix: use one of {configs.LINEAR_KINDS}.")


def linear_params(kind: str, n: int, m: int, lin: ml_collections.ConfigDict) -> int:
  """Trainable parameters of one n -> m projection of `kind` (static indices excluded)."""
  _check_kind(kind)
  if kind == "dense":
    return n * m
  low_rank = lin.rank * (n + m)
  if kind == "lost":
    return low_rank + configs.lost_keep(n, lin.sparsity) * m
  if kind == "sltrain":
    return low_rank + sltrain_nnz(n, m, lin.density)
  return low_rank                                   # low_rank, cola


def linear_static_indices(kind: str, n: int, m: int, lin: ml_collections.ConfigDict) -> int:
  """int32 index entries of one projection: LOST's k channels, SLTrain's nnz support."""
  _check_kind(kind)
  if kind == "lost":
    return configs.lost_keep(n, lin.sparsity)
  if kind == "sltrain":
    return sltrain_nnz(n, m, lin.density)
  return 0


def linear_flops(kind: str, n: int, m: int, lin: ml_collections.ConfigDict) -> int:
  """Forward FLOPs per token of one n -> m projection (SLTrain: dense 2nm, see module doc)."""
  _check_kind(kind)
  if kind in ("dense", "sltrain"):
    return 2 * n * m
  low_rank = 2 * lin.rank * (n + m)
  if kind == "lost":
    return low_rank + 2 * configs.lost_keep(n, lin.sparsity) * m
  return low_rank                                   # low_rank, cola


def count_params(model: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameter counts of `lost_jax.Llama(model)`: projections, RMSNorm scales (2 a block,
  4 with post_norms, + q/k norms of head_dim), q/k/v biases, untied head (a tied HF
  checkpoint counts the embedding once: total - lm_head)."""
  lin, d, v = model.linear, model.d_model, model.vocab_size
  arch = configs.Arch.of(model)
  shapes = configs.projection_shapes(model)
  proj_per_layer = sum(linear_params(lin.kind, n, m, lin) for _, n, m in shapes)
  proj_per_layer += (model.n_heads + 2 * model.n_kv_heads) * arch.head_dim * arch.qkv_bias
  norms_per_layer = (4 if arch.post_norms else 2) * d + 2 * arch.head_dim * arch.qk_norm
  counts = dict(
      embeddings=v * d,
      projections=model.n_layers * proj_per_layer,
      layers=model.n_layers * (proj_per_layer + norms_per_layer),
      final_norm=d,
      lm_head=d * v,
  )
  counts["total"] = (counts["embeddings"] + counts["layers"] + counts["final_norm"]
                     + counts["lm_head"])
  counts["trainable"] = counts["total"]             # indices are StaticIndices, not nnx.Param
  counts["static_indices"] = model.n_layers * sum(
      linear_static_indices(lin.kind, n, m, lin) for _, n, m in shapes)
  return counts


def forward_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> int:
  """Forward FLOPs per token: projections + full (non-causal) attention over seq_len keys, or
  the window's keys in a local layer + LM head."""
  lin = model.linear
  arch = configs.Arch.of(model)
  proj = sum(linear_flops(lin.kind, n, m, lin) for _, n, m in configs.projection_shapes(model))
  q_dim = model.n_heads * arch.head_dim
  keys = sum(min(seq_len, arch.sliding_window) if local else seq_len
             for local in arch.local_layers(model.n_layers))
  attn = 2 * 2 * keys * q_dim                       # QK^T and AV, summed over the layers
  return model.n_layers * proj + attn + 2 * model.d_model * model.vocab_size


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> int:
  """Forward + backward FLOPs per token (3 x forward)."""
  return 3 * forward_flops_per_token(model, seq_len)


def _activation(lin: ml_collections.ConfigDict) -> str:
  # As layers.make_linear: CoLA always uses SiLU between its factors.
  return "silu" if lin.kind == "cola" else lin.activation


def linear_activation_entries(kind: str, n: int, m: int, lin: ml_collections.ConfigDict) -> int:
  """Entries per token a projection saves for backward beyond its input x (counted by the block).

  LOST: z = x @ A (r), act(z) (r more when act is SiLU) and the gathered x[..., I] (k);
  low_rank / CoLA: z (r) and act(z) when SiLU; dense and SLTrain: nothing per token.
  """
  _check_kind(kind)
  if kind in ("dense", "sltrain"):
    return 0
  factor = lin.rank * (2 if _activation(lin) == "silu" else 1)
  if kind == "lost":
    return factor + configs.lost_keep(n, lin.sparsity)
  return factor


def block_activation_bytes_per_token(model: ml_collections.ConfigDict, seq_len: int,
                                     compute_bytes: int) -> int:
  """Bytes one block saves for backward per token, without remat.

  c * (4D + 2(H hd) + 2(G hd) + 3F + extras) + H * seq_len * (4 + c):
  the two norm inputs and outputs (4D), q and k after RoPE and v (H hd + 2 G hd), the attention
  output feeding o (H hd), gate and up outputs and their product feeding down (3F), the
  factored layers' extras (`linear_activation_entries`), and the softmax probabilities per
  query (float32 for the softmax backward plus the compute-dtype copy feeding AV; one copy
  when computing in float32).
  """
  lin, d, f = model.linear, model.d_model, model.ffn_dim
  hd = configs.head_dim(model)
  q_dim, kv_dim = model.n_heads * hd, model.n_kv_heads * hd
  extras = sum(linear_activation_entries(lin.kind, n, m, lin)
               for _, n, m in configs.projection_shapes(model))
  entries = 4 * d + 2 * q_dim + 2 * kv_dim + 3 * f + extras
  probs_bytes = FLOAT32_BYTES + (compute_bytes if compute_bytes < FLOAT32_BYTES else 0)
  return compute_bytes * entries + model.n_heads * seq_len * probs_bytes


def block_activation_bytes_per_step(model: ml_collections.ConfigDict,
                                    compute_bytes: int) -> int:
  """Batch-independent bytes one block saves: SLTrain's materialised compute-dtype kernels."""
  lin = model.linear
  if lin.kind != "sltrain":
    return 0
  return compute_bytes * sum(n * m for _, n, m in configs.projection_shapes(model))


def head_activation_bytes_per_token(model: ml_collections.ConfigDict, compute_bytes: int) -> int:
  """Final norm input and output (2D, compute dtype) + float32 logits and softmax (2V)."""
  return compute_bytes * 2 * model.d_model + FLOAT32_BYTES * 2 * model.vocab_size


def activation_bytes(model: ml_collections.ConfigDict, seqs: int, seq_len: int,
                     compute_bytes: int) -> int:
  """Peak saved activations of one forward/backward pass over [seqs, seq_len] tokens.

  Without remat every block keeps its activations. With remat (model.remat) only each block's
  input (c * D per token) is kept, plus one block's activations while it is recomputed.
  """
  tokens = seqs * seq_len
  block = (block_activation_bytes_per_token(model, seq_len, compute_bytes) * tokens
           + block_activation_bytes_per_step(model, compute_bytes))
  if model.remat:
    blocks = model.n_layers * compute_bytes * model.d_model * tokens + block
  else:
    blocks = model.n_layers * block
  return blocks + head_activation_bytes_per_token(model, compute_bytes) * tokens


def linear_param_shapes(kind: str, n: int, m: int, lin: ml_collections.ConfigDict
                        ) -> list[tuple[int, ...]]:
  """Shapes of the trainable parameters of one n -> m projection (as layers.make_linear)."""
  _check_kind(kind)
  if kind == "dense":
    return [(n, m)]
  factors = [(n, lin.rank), (m, lin.rank)]
  if kind == "lost":
    return factors + [(configs.lost_keep(n, lin.sparsity), m)]
  if kind == "sltrain":
    return factors + [(sltrain_nnz(n, m, lin.density),)]
  return factors                                    # low_rank, cola


def param_shapes(model: ml_collections.ConfigDict) -> list[tuple[int, ...]]:
  """Shapes of every trainable parameter of `Llama(model)`: embedding, blocks, norm, head."""
  lin, d = model.linear, model.d_model
  block = [(d,), (d,)]
  for _, n, m in configs.projection_shapes(model):
    block += linear_param_shapes(lin.kind, n, m, lin)
  return [(model.vocab_size, d)] + block * model.n_layers + [(d,), (d, model.vocab_size)]


def _galore_shapes(cfg: ml_collections.ConfigDict):
  """(projected-moment shape, projector entries) of every GaLore-projected block kernel [n, m].

  As optax.contrib.galore: r' = min(galore_rank, n, m); moments [r', m] when n >= m, else
  [n, r']; the projector holds r' * max(n, m) entries.
  """
  out = []
  for _, n, m in configs.projection_shapes(cfg.model):
    r = min(cfg.train.galore_rank, n, m)
    out.append(((r, m) if n >= m else (n, r), r * max(n, m)))
  return out * cfg.model.n_layers


def _check_optimizer(cfg: ml_collections.ConfigDict) -> None:
  if cfg.train.optimizer not in configs.OPTIMIZERS:
    raise ValueError(f"config.train.optimizer={cfg.train.optimizer!r} is unknown. "
                     f"Fix: use one of {configs.OPTIMIZERS}.")
  if cfg.train.optimizer.startswith("galore") and cfg.model.linear.kind != "dense":
    raise ValueError(f"config.train.optimizer={cfg.train.optimizer!r} projects dense "
                     "gradients. Fix: set model.linear.kind='dense'.")


def _adam_moments_and_rest(cfg: ml_collections.ConfigDict):
  """(shapes each holding two Adam moments, other float entries: GaLore projectors)."""
  _check_optimizer(cfg)
  shapes = param_shapes(cfg.model)
  if not cfg.train.optimizer.startswith("galore"):
    return shapes, 0
  galore = _galore_shapes(cfg)
  kernels = [(n, m) for _, n, m in configs.projection_shapes(cfg.model)] * cfg.model.n_layers
  for kernel in kernels:
    shapes.remove(kernel)
  return shapes + [moment for moment, _ in galore], sum(p for _, p in galore)


def optimizer_state_entries(cfg: ml_collections.ConfigDict) -> int:
  """Optimizer-state entries (values, whatever their storage) of a run config.

  AdamW: two moments per trainable parameter. GaLore (optax.contrib.galore on every dense block
  kernel [n, m], AdamW elsewhere), with r' = min(galore_rank, n, m): two moments of the
  projected gradient, r' * min(n, m) each, plus the projector r' * max(n, m). The SVD workspace
  of a projector refresh and the step counters are not counted.
  """
  moments, rest = _adam_moments_and_rest(cfg)
  return 2 * sum(math.prod(s) for s in moments) + rest


def eight_bit_moment_bytes(shape: tuple[int, ...], float_bytes: int) -> int:
  """Bytes of one Adam moment under optim.scale_by_adam_8bit: 1 byte per value + a float32
  scale per 256 values of the last axis, or float_bytes per value under MIN_8BIT_SIZE values."""
  if len(shape) >= 1 and math.prod(shape) >= MIN_8BIT_SIZE:
    rows = math.prod(shape[:-1])
    return math.prod(shape) + 4 * rows * math.ceil(shape[-1] / STATE_BLOCK)
  return float_bytes * math.prod(shape)


def optimizer_state_bytes(cfg: ml_collections.ConfigDict) -> int:
  """Optimizer-state bytes: entries in the parameter dtype, or 8-bit moments ('*8bit')."""
  param_bytes, _ = _precision_bytes(cfg)
  moments, rest = _adam_moments_and_rest(cfg)
  if not cfg.train.optimizer.endswith("8bit"):
    return param_bytes * optimizer_state_entries(cfg)
  return 2 * sum(eight_bit_moment_bytes(s, param_bytes) for s in moments) + param_bytes * rest


NF4_BLOCK = 64            # values per float32 scale of an NF4 base kernel (lost_jax.quant)


def nf4_kernel_bytes(n: int, m: int) -> int:
  """An NF4 kernel [n, m]: half a byte per (padded) value + a float32 scale per 64 values."""
  blocks = math.ceil(m / NF4_BLOCK)
  return n * blocks * (NF4_BLOCK // 2 + 4)


def base_weight_bytes(model: ml_collections.ConfigDict, quantize: str = "none",
                      param_bytes: int = 2) -> int:
  """Frozen base of a fine-tune: every parameter in param_bytes, or (quantize='nf4') the block
  projections in NF4 and embedding, head and norms in param_bytes (init.quantize)."""
  counts = count_params(model)
  if quantize == "none":
    return param_bytes * counts["total"]
  if quantize != "nf4":
    raise ValueError(f"config.init.quantize={quantize!r} is unknown. Fix: use 'none' or 'nf4'.")
  shapes = configs.projection_shapes(model)
  kernels = model.n_layers * sum(nf4_kernel_bytes(n, m) for _, n, m in shapes)
  rest = counts["total"] - model.n_layers * sum(n * m for _, n, m in shapes)
  return kernels + param_bytes * rest


def _precision_bytes(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  if cfg.train.precision not in PRECISION_BYTES:
    raise ValueError(f"config.train.precision={cfg.train.precision!r} is unknown. "
                     f"Fix: use one of {tuple(PRECISION_BYTES)}.")
  return PRECISION_BYTES[cfg.train.precision]


def memory_estimate(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Training memory in bytes of a run config: weights, gradients, optimizer, activations.

  weights = parameters in the train.precision dtype + int32 static indices; gradients and
  optimizer states share the parameter dtype (8-bit optimizers: `optimizer_state_bytes`); activations (`activation_bytes`) are for one
  pass of train.batch_size / train.microbatches sequences of data.seq_len tokens.
  """
  param_bytes, compute_bytes = _precision_bytes(cfg)
  counts = count_params(cfg.model)
  seqs = cfg.train.batch_size // cfg.train.microbatches
  mem = dict(
      weights=param_bytes * counts["total"] + INDEX_BYTES * counts["static_indices"],
      gradients=param_bytes * counts["trainable"],
      optimizer=optimizer_state_bytes(cfg),
      activations=activation_bytes(cfg.model, seqs, cfg.data.seq_len, compute_bytes),
  )
  mem["total"] = sum(mem.values())
  return mem


def device_memory_estimate(cfg: ml_collections.ConfigDict, data: int = 1, fsdp: int = 1,
                           tensor: int = 1) -> dict[str, int]:
  """`memory_estimate` per device of a (data, fsdp, tensor) mesh, in bytes.

  Weights, gradients and optimizer state are split over fsdp x tensor (data replicates them);
  with gradient accumulation (train.microbatches > 1) a float32 accumulator of every trainable
  parameter is added, split the same way; under model.perf.layer_loop='scan' the blocks'
  stacked copy of weights and gradients too. Activations are those of the rows one device
  holds per pass, train.batch_size / microbatches / (data x fsdp), not split over tensor (an
  upper bound). Arrays no mesh axis divides are counted as split (they are small).
  """
  shards, state_split = data * fsdp, fsdp * tensor
  t = cfg.train
  if min(data, fsdp, tensor) < 1 or t.batch_size % (shards * t.microbatches):
    raise ValueError(f"train.batch_size={t.batch_size} in {t.microbatches} micro-batches does "
                     f"not split over data x fsdp = {shards}. Fix: a batch size that is a "
                     f"multiple of {shards * t.microbatches}.")
  param_bytes, compute_bytes = _precision_bytes(cfg)
  whole = memory_estimate(cfg)
  counts = count_params(cfg.model)
  rows = t.batch_size // t.microbatches // shards
  accumulator = FLOAT32_BYTES * counts["trainable"] if t.microbatches > 1 else 0
  perf = cfg.model.get("perf", {})
  stacked = (2 * param_bytes * counts["layers"]
             if perf.get("layer_loop", "auto") == "scan" else 0)
  mem = dict(
      weights=whole["weights"] // state_split,
      gradients=(whole["gradients"] + accumulator + stacked) // state_split,
      optimizer=whole["optimizer"] // state_split,
      activations=activation_bytes(cfg.model, rows, cfg.data.seq_len, compute_bytes),
  )
  mem["total"] = sum(mem.values())
  return mem


def report(cfg: ml_collections.ConfigDict) -> dict:
  """Params, FLOPs per token and memory of a run config, in one dict."""
  lin = cfg.model.linear
  return dict(
      name=cfg.name,
      kind=lin.kind,
      rank=lin.rank if lin.kind != "dense" else 0,
      optimizer=cfg.train.optimizer,
      params=count_params(cfg.model),
      forward_flops_per_token=forward_flops_per_token(cfg.model, cfg.data.seq_len),
      train_flops_per_token=train_flops_per_token(cfg.model, cfg.data.seq_len),
      tokens_per_pass=(cfg.train.batch_size // cfg.train.microbatches) * cfg.data.seq_len,
      memory=memory_estimate(cfg),
  )


# Run settings that `compare(..., like=cfg)` copies so every row is measured the same way.
_SHARED = (("train", "batch_size"), ("train", "microbatches"), ("train", "precision"),
           ("data", "seq_len"), ("model", "remat"))


def compare(size: str, like: ml_collections.ConfigDict | None = None) -> list[dict]:
  """`report` of every method in configs.METHODS at `size` (with `like`'s batch/precision and,
  when like's optimizer is 8-bit, every method's optimizer in its 8-bit variant)."""
  rows = []
  for method in configs.METHODS:
    cfg = configs.pretrain_config(size, method)
    if like is not None:
      for group, field in _SHARED:
        cfg[group][field] = like[group][field]
      if like.train.optimizer.endswith("8bit"):          # 8-bit states for every method
        cfg.train.optimizer += "8bit"
    rows.append(dict(method=method, **report(cfg)))
  return rows


_GIB = 2 ** 30
_COLUMNS = (  # header, width, row -> text
    ("run", 22, lambda r: r["name"]),
    ("linear", 8, lambda r: r["kind"]),
    ("rank", 5, lambda r: str(r["rank"])),
    ("optimizer", 10, lambda r: r["optimizer"]),
    ("params M", 9, lambda r: f"{r['params']['total'] / 1e6:.2f}"),
    ("proj M", 8, lambda r: f"{r['params']['projections'] / 1e6:.2f}"),
    ("fwd GF/tok", 10, lambda r: f"{r['forward_flops_per_token'] / 1e9:.3f}"),
    ("weights", 8, lambda r: f"{r['memory']['weights'] / _GIB:.2f}"),
    ("grads", 7, lambda r: f"{r['memory']['gradients'] / _GIB:.2f}"),
    ("opt state", 9, lambda r: f"{r['memory']['optimizer'] / _GIB:.2f}"),
    ("activ", 8, lambda r: f"{r['memory']['activations'] / _GIB:.2f}"),
    ("total GiB", 9, lambda r: f"{r['memory']['total'] / _GIB:.2f}"),
)


def format_table(rows: list[dict], cfg: ml_collections.ConfigDict) -> str:
  """Fixed-width text table of `report` rows, with the shared run settings in a header line."""
  t = cfg.train
  lines = [f"precision={t.precision} | activations for {t.batch_size // t.microbatches} "
           f"sequences x {cfg.data.seq_len} tokens per pass | remat={cfg.model.remat} | "
           f"memory in GiB, one replica, no sharding"]
  lines.append("  ".join(h.rjust(w) if i > 3 else h.ljust(w)
                         for i, (h, w, _) in enumerate(_COLUMNS)))
  for row in rows:
    lines.append("  ".join(fn(row).rjust(w) if i > 3 else fn(row).ljust(w)
                           for i, (_, w, fn) in enumerate(_COLUMNS)))
  return "\n".join(lines)


MICROBATCHED = 16   # the micro-batch count `explain_compare` shows beside a one-pass config


def explain_compare(rows: list[dict], cfg: ml_collections.ConfigDict) -> list[str]:
  """What dominates `compare` rows (activations of one pass, without remat) and why LOST's
  total can exceed full-rank's, with the totals micro-batched beside them."""
  t, by = cfg.train, {r["method"]: r for r in rows}
  tokens = rows[0]["tokens_per_pass"]
  full, lost = by.get("full_rank"), by.get("lost")
  if full is None:
    return []
  gib = lambda b: f"{b / _GIB:.2f}"
  mem = full["memory"]
  remat = "with" if cfg.model.remat else "without"
  lines = [f"why: activations dominate: {gib(mem['activations'])} of {gib(mem['total'])} GiB "
           f"for full_rank, saved for backward over the {tokens:,} tokens of one pass "
           f"({t.batch_size // t.microbatches} sequences x {cfg.data.seq_len}), {remat} remat."]
  if lost is not None and lost["memory"]["total"] > mem["total"]:
    state = lambda r: sum(r["memory"][k] for k in ("weights", "gradients", "optimizer"))
    extra = lost["memory"]["activations"] - mem["activations"]
    lines.append(
        f"  lost saves {gib(state(full) - state(lost))} GiB of weights, gradients and optimizer "
        f"state but keeps {gib(extra)} GiB more activations: each factored projection also "
        "saves x @ A (rank r), its SiLU and the kept input channels per token, beside what a "
        "dense block keeps.")
  micro = t.microbatches * MICROBATCHED
  if t.batch_size % micro == 0:
    like = ml_collections.ConfigDict(cfg.to_dict())
    like.train.microbatches = micro
    again = {r["method"]: r["memory"]["total"] for r in compare(cfg.name.partition(",")[0],
                                                                  like=like)}
    lines.append(f"  micro-batched (train.microbatches={micro}: {tokens // MICROBATCHED:,} tokens "
                 "per pass), total GiB: " + " | ".join(f"{m} {gib(b)}" for m, b in again.items()))
  return lines


def finetune_base_line(cfg: ml_collections.ConfigDict, tied: bool) -> str:
  """The frozen base of a fine-tuning config: its parameters (a tied head counted once, as
  its checkpoint holds it), forward FLOPs per token, and its weights unquantised vs NF4."""
  model = cfg.model
  p = count_params(model)
  held = p["total"]
  distinct = held - p["lm_head"] if tied else held
  copy = (f" (embedding and head tied; lost_jax holds the head as a copy: "
          f"{held / 1e6:.1f}M in memory)" if tied else "")
  bf16, nf4 = base_weight_bytes(model, "none"), base_weight_bytes(model, "nf4")
  seq = cfg.data.seq_len
  return (f"{cfg.name}: frozen base {distinct / 1e6:.1f}M parameters{copy} | forward "
          f"{forward_flops_per_token(model, seq) / 1e9:.3f} GFLOP/token at {seq} tokens | bf16 "
          f"{bf16 / _GIB:.2f} GiB | init.quantize=nf4 {nf4 / _GIB:.2f} GiB ({nf4 / bf16:.2f}x; "
          "block projections 4.5 bits per weight, embedding, head and norms bf16)")


def _base_ties_embeddings(path: str) -> bool:
  """Whether the base at init.path (GGUF file or HF directory) ties its head to the
  embedding; False for anything else (a pre-training run's head is its own)."""
  from lost_jax.formats import bases  # pylint: disable=g-import-not-at-top
  return bool((bases.hf_config(path) or {}).get("tie_word_embeddings", False))


def _main(argv, config_flag, compare_flag):
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cfg = config_flag.value
  if "init" in cfg:          # a fine-tuning config: the frozen base, unquantised vs NF4
    print(finetune_base_line(cfg, _base_ties_embeddings(cfg.init.path)))
    return
  try:
    rows = compare(cfg.name.partition(",")[0], like=cfg) if compare_flag.value else [report(cfg)]
  except ValueError as e:       # a bad setting: one line naming it and the fix, exit status 2
    print(f"error: {e}")
    raise SystemExit(2) from None
  if compare_flag.value:
    print(format_table(rows, cfg))
    print("\n".join(explain_compare(rows, cfg)))
    return
  r = rows[0]
  p = r["params"]
  print(format_table([r], cfg))
  print(f"params: embeddings {p['embeddings']:,} | layers {p['layers']:,} (projections "
        f"{p['projections']:,}) | final_norm {p['final_norm']:,} | lm_head {p['lm_head']:,} | "
        f"total {p['total']:,} | static int32 indices {p['static_indices']:,}")
  print(f"FLOPs/token: forward {r['forward_flops_per_token']:,} | train "
        f"{r['train_flops_per_token']:,} (3 x forward; attention counted as full)")


def run():
  """Define the flags (only here, so importing this module defines none) and run."""
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Run config, e.g. configs/pretrain.py:llama_1b,lost.", lock_config=True)
  compare_flag = flags.DEFINE_bool("compare", False, "One row per method at the config's size.")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: _main(argv, config_flag, compare_flag),
          flags_parser=usage.parse_flags)


if __name__ == "__main__":
  run()
