"""The config groups (ml_collections) and the shape arithmetic a config implies (pure Python)."""

from __future__ import annotations

import math
from typing import NamedTuple

import ml_collections

from lost_jax.configs.choices import LOSS_CHUNK


def linear_config(kind: str = "dense", rank: int = 0) -> ml_collections.ConfigDict:
  """Settings of the projection factory; unused fields are ignored by other kinds."""
  return ml_collections.ConfigDict(dict(
      kind=kind,
      rank=rank,
      sparsity=0.01,          # LOST rho: fraction of input channels kept in S.
      gamma=0.7,              # LOST mixing weight of the low-rank branch.
      activation="silu",      # between the factors (LOST, CoLA); low_rank uses identity.
      init="kaiming",         # initializer of the full-rank weight LOST decomposes.
      # initializer of a dense kernel: normal (N(0, model.init_std), LLaMA's) | kaiming (LOST's
      # init of the weight it decomposes, U(+-1/sqrt(fan_in)): the init control).
      dense_init="normal",
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


def rope_scaling_config(type: str = "default", factor: float = 1.0,  # pylint: disable=redefined-builtin
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_max_position_embeddings: int = 8192
                        ) -> ml_collections.ConfigDict:
  """RoPE rescaling as HF's rope_scaling: default (none) | linear | llama3 (LLaMA 3.1/3.2)."""
  return ml_collections.ConfigDict(dict(
      type=type, factor=float(factor), low_freq_factor=float(low_freq_factor),
      high_freq_factor=float(high_freq_factor),
      original_max_position_embeddings=int(original_max_position_embeddings)))


# Settings of the model group that decide how it computes, not what: no checkpoint or model
# file holds them, a run takes them from its own config (a fine-tune's from its config, not
# from its base) and may change them on resume.
COMPUTE_SETTINGS = ("remat", "perf")


def compute_settings(model: ml_collections.ConfigDict) -> dict:
  """The model group's COMPUTE_SETTINGS (those it has), as plain values."""
  return {k: model[k].to_dict() if isinstance(model[k], ml_collections.ConfigDict) else model[k]
          for k in COMPUTE_SETTINGS if k in model}


# Architecture settings of the one decoder (model config fields). The defaults are LLaMA's;
# the other families (Qwen2/3, Mistral, Gemma 3) set some of them (`presets.FAMILIES`).
ARCH_DEFAULTS = dict(
    family="llama",          # the HF architecture a dense model exports as (formats/hf.py)
    head_dim=0,              # per-head width; 0: d_model // n_heads
    qkv_bias=False,          # q/k/v output biases (Qwen2)
    qk_norm=False,           # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    mlp_activation="silu",   # gated FFN: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    norm_scale="w",          # RMSNorm multiplier: w (LLaMA) | 1+w (Gemma: scales stored as w)
    embed_scale=False,       # embeddings x sqrt(d_model), in the compute dtype (Gemma)
    post_norms=False,        # RMSNorm on the attention and FFN outputs too (Gemma 3)
    sliding_window=0,        # keys a local layer sees (itself included); 0: no local layers
    # per-layer attention, repeated over the layers: G global, L local (sliding_window);
    # Gemma 3: LLLLLG; Mistral: L.
    attention_pattern="G",
    rope_local_theta=0.0,    # RoPE base of local layers; 0: rope_theta
    query_pre_attn_scalar=0.0,   # attention scale = this ** -0.5 (Gemma); 0: head_dim
)


class Arch(NamedTuple):
  """A model config's architecture settings, absent fields (older configs) at their defaults."""
  family: str
  head_dim: int
  qkv_bias: bool
  qk_norm: bool
  mlp_activation: str
  norm_scale: str
  embed_scale: bool
  post_norms: bool
  sliding_window: int
  attention_pattern: str
  rope_local_theta: float
  query_pre_attn_scalar: float

  @classmethod
  def of(cls, model: ml_collections.ConfigDict) -> "Arch":
    arch = cls(**{k: model.get(k, v) for k, v in ARCH_DEFAULTS.items()})
    return arch._replace(head_dim=arch.head_dim or model.d_model // model.n_heads)

  def local_layers(self, n_layers: int) -> tuple[int, ...]:
    """1 for each local (sliding-window) layer, 0 for each global one."""
    if not self.sliding_window:
      return (0,) * n_layers
    pattern = self.attention_pattern
    return tuple(int(pattern[i % len(pattern)] == "L") for i in range(n_layers))

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


def head_dim(model: ml_collections.ConfigDict) -> int:
  """Per-head width: model.head_dim, or d_model // n_heads when it is 0 or absent."""
  return model.get("head_dim", 0) or model.d_model // model.n_heads


def projection_shapes(model: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """(name, in n, out m) of every q/k/v/o/gate/up/down of one block."""
  d, f = model.d_model, model.ffn_dim
  hd = head_dim(model)
  q, kv = model.n_heads * hd, model.n_kv_heads * hd
  return [("q", d, q), ("k", d, kv), ("v", d, kv), ("o", q, d),
          ("gate", d, f), ("up", d, f), ("down", f, d)]


def lost_keep(n: int, sparsity: float) -> int:
  """Number of kept input channels k = max(1, ceil(rho * n))."""
  return max(1, math.ceil(sparsity * n - 1e-9))


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh sizes (one may be -1: fill) and the multi-process runtime (jax.distributed)."""
  return ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,
      # True: data / fsdp / tensor and train.microbatches are chosen at start-up so the step's
      # closed-form memory estimate fits the device (parallel/auto_mesh.py); one line says
      # what was picked and why. Resuming on other devices chooses again.
      auto=False,
      memory_gib=0.0,         # per-device memory for mesh.auto; 0: what the device reports
      distributed=False,      # True: jax.distributed.initialize before the mesh is built.
      coordinator_address="",  # host:port of process 0; "" lets JAX detect (TPU pod, SLURM).
      num_processes=-1,       # -1: detect.
      process_id=-1,          # -1: detect.
      init_timeout_s=300,     # seconds to wait for every process at start-up, then one error
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


