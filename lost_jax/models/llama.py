"""LLaMA decoder (Flax NNX) whose projections come from one factory (`layers.make_linear`).

Pre-norm RMSNorm, RoPE (HF rotate-half convention), SwiGLU, causal GQA attention that honours
packed-sequence segment ids, untied LM head. Norms, softmax and logits run in float32.
The other families are settings of the same forward (`configs.Arch`): head_dim apart from
d_model / n_heads, q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3), GeGLU, the
(1 + w) RMSNorm scale, scaled embeddings and post-attention/FFN norms (Gemma), and local
sliding-window layers with their own RoPE base (Mistral, Gemma 3). What differs by layer (local
or global) is a per-layer flag the layer loop passes in (scanned under layer_loop='scan').

This is the only decoder forward: training, decoding (`generate`, through a `Cache`) and
SparseLoRA (`sparselora`, through per-layer channel plans) all run `Llama.__call__`. What they
need is passed in: LoRA deltas ride inside the projections (`lora.LoRALinear`), a channel
plan decides how each block's projections run (`DenseChannels` is the default), a KV cache
with slot positions, and `logits_from`, the first position whose logits are wanted.
Performance choices (matmul backward, attention kernel, layer loop) are read from `cfg.perf`,
resolved once from the compile target (`configs.resolve_perf`); the math never asks for the
backend. Both layer loops keep the parameters as one `Block` per layer (`model.layers[i]`), so
checkpoints, LoRA, HF import/export and SparseLoRA see one layout; `scan` stacks the blocks'
state inside the step and runs one `jax.lax.scan` over it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lost_jax import configs as configs_lib
from lost_jax.layers.factory import make_linear
from lost_jax.layers.linear import DenseLinear
from lost_jax.ops.attention import attention_core, cache_attention, is_global, window_mask
from lost_jax.ops.matmul import matmul
from lost_jax.parallel.sharding import constrain_batch, constrain_logical


def as_dtype(name: str | Any):
  return jnp.dtype(name) if isinstance(name, str) else name


def rms_norm(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float, plus_one: bool = False
             ) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * scale (or (1 + scale): Gemma) over the last axis, in
  float32; returns float32 [..., D]."""
  x = x_BxLxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  scale = scale_D.astype(jnp.float32)
  return x * (1.0 + scale if plus_one else scale)


@jax.custom_vjp
def swiglu(gate_BxF: jax.Array, up_BxF: jax.Array) -> jax.Array:
  """silu(gate) * up [..., F] in float32 math, returned in up's dtype.

  One custom VJP so the forward is one elementwise pass and the backward one pass over
  (gate, up, cotangent) that recomputes sigmoid(gate): JAX's own derivative of
  silu(g) * u saves sigmoid(g) and runs the bf16 product rule as several separate
  bf16 <-> float32 passes over the [tokens, ffn] activations.
  """
  g, u = gate_BxF.astype(jnp.float32), up_BxF.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * u).astype(up_BxF.dtype)


def _swiglu_fwd(gate_BxF, up_BxF):
  return swiglu(gate_BxF, up_BxF), (gate_BxF, up_BxF)


def _swiglu_bwd(residuals, dy_BxF):
  gate_BxF, up_BxF = residuals
  g, u = gate_BxF.astype(jnp.float32), up_BxF.astype(jnp.float32)
  dy = dy_BxF.astype(jnp.float32)
  s = jax.nn.sigmoid(g)
  # d silu(g) / dg = s + g s (1 - s)
  dg = dy * u * (s * (1.0 + g * (1.0 - s)))
  return dg.astype(gate_BxF.dtype), (dy * g * s).astype(up_BxF.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# The gated FFN's activation by model.mlp_activation (gelu_tanh: HF's gelu_pytorch_tanh).
GATE_ACTIVATIONS = {"silu": jax.nn.silu,
                    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def gated(gate_BxF: jax.Array, up_BxF: jax.Array, activation: str) -> jax.Array:
  """act(gate) * up [..., F] in float32 math, in up's dtype (silu: the fused `swiglu`)."""
  if activation == "silu":
    return swiglu(gate_BxF, up_BxF)
  g, u = gate_BxF.astype(jnp.float32), up_BxF.astype(jnp.float32)
  return (GATE_ACTIVATIONS[activation](g) * u).astype(up_BxF.dtype)


class RopeScaling(NamedTuple):
  """RoPE frequency rescaling (HF `rope_scaling`); hashable, so it stays static under jit."""
  type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0             # llama3 only
  high_freq_factor: float = 4.0            # llama3 only
  original_max_position_embeddings: int = 8192   # llama3 only


def rope_scaling_of(cfg: ml_collections.ConfigDict) -> RopeScaling:
  """The model config's `rope_scaling` group (absent in older configs: no scaling)."""
  group = cfg.get("rope_scaling")
  return RopeScaling(**group.to_dict()) if group is not None else RopeScaling()


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()
                  ) -> jax.Array:
  """Per-pair angular frequencies [head_dim / 2] (float32), rescaled as HF's rope types do.

  linear: every frequency / factor. llama3 (LLaMA 3.1/3.2): wavelengths longer than
  original_max / low_freq_factor are divided by factor, shorter than original_max /
  high_freq_factor kept, and those between interpolated smoothly.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling.type == "default":
    return inv_freq
  if scaling.type == "linear":
    return inv_freq / scaling.factor
  if scaling.type != "llama3":
    raise ValueError(f"config.model.rope_scaling.type={scaling.type!r} is unknown. Fix: one "
                     f"of {configs_lib.ROPE_TYPES}.")
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((old_len / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_BxL: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling = RopeScaling()):
  """cos, sin [B, L, 1, head_dim] for HF-style rotate-half RoPE (float32)."""
  inv_freq = rope_inv_freq(head_dim, theta, scaling)
  angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq     # [B, L, hd/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxLxHxK: jax.Array, cos, sin) -> jax.Array:
  """Rotate pairs (i, i + K/2) of each head by the position angle."""
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxLxHxK.dtype)


class LayerCache(NamedTuple):
  """One layer's keys and values [B, S, G, K]; the T new tokens go to slots [start, start+T)."""
  k: jax.Array
  v: jax.Array
  start: int | jax.Array
  valid: jax.Array           # [B, S] bool: slots holding real tokens (left padding is False)


class Cache(NamedTuple):
  """KV cache of every layer: kv = ((k, v), ...) [B, S, G, K] each (layer_loop 'unrolled') or
  (k, v) [n_layers, B, S, G, K] (layer_loop 'scan'); start and valid as in LayerCache."""
  kv: tuple
  start: int | jax.Array
  valid: jax.Array

  @classmethod
  def zeros(cls, cfg, batch: int, slots: int, valid_BxS: jax.Array, dtype) -> "Cache":
    """An empty cache laid out for cfg's (resolved) layer loop."""
    shape = (batch, slots, cfg.n_kv_heads, configs_lib.head_dim(cfg))
    if cfg.perf.get("layer_loop") == "scan":
      shape = (cfg.n_layers,) + shape
      return cls((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), 0, valid_BxS)
    kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
               for _ in range(cfg.n_layers))
    return cls(kv, 0, valid_BxS)


def dense_projection(name: str, lin, x_BxLxN: jax.Array, bias_M: jax.Array | None = None
                     ) -> jax.Array:
  """A projection run as itself (base + LoRA delta on every channel and token) + its bias."""
  del name
  y = lin(x_BxLxN)
  return y if bias_M is None else y + bias_M.astype(y.dtype)


class DenseChannels:
  """Channel plan of a dense layer: every projection on every channel (the default)."""

  def attention_projection(self, attn, h_BxLxD: jax.Array):
    """(name, linear, x, bias) -> y used for q, k, v and o of this layer, given its normed
    input (bias: the output bias or None)."""
    del attn, h_BxLxD
    return dense_projection

  def mlp(self, mlp, h_BxLxD: jax.Array) -> jax.Array:
    return mlp(h_BxLxD)

  def dense_from(self) -> int:
    """First position from which this plan runs every projection dense (0: all)."""
    return 0


DENSE = DenseChannels()


def remat_call(fn, block, x):
  """jax.checkpoint of fn(block, x) on the block's split state.

  nnx.remat fails under a plain jax.grad that differentiates only part of the state (frozen
  base kernels arrive as non-differentiated tracers: "Cannot mutate Param from a different
  trace level"); a pure checkpoint works with both jax.grad and nnx.grad. Mutable state
  (dropout RNG counters) is returned and written back.
  """
  graphdef, state = nnx.split(block)

  def pure(state, y):
    blk = nnx.merge(graphdef, state)
    out = fn(blk, y)
    return out, nnx.state(blk, nnx.RngState)

  out, rng_state = jax.checkpoint(pure)(state, x)
  nnx.update(block, rng_state)
  return out


def scan_blocks(blocks, body, x, xs=None, *, remat: bool = False):
  """body(block, x, xs_i) -> (x, ys_i) over the blocks as one jax.lax.scan; (x, ys [n, ...]).

  The blocks' states (parameters, static indices, RNG counters) are stacked on a leading
  layer axis inside the step and the block is traced once from the first block's graph, so
  a deep model compiles one block. Gradients flow back through the stack to each block's own
  parameters. RNG counters the body advances are written back to each block.
  """
  graphdef, first = nnx.split(blocks[0])
  states = [first] + [nnx.state(b) for b in blocks[1:]]
  want = jax.tree.structure(first)
  for i, st in enumerate(states):
    if jax.tree.structure(st) != want:
      raise ValueError(f"layer_loop='scan' needs blocks of one structure; block {i} differs "
                       "from block 0. Fix: set model.perf.layer_loop='unrolled'.")
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)

  def step(y, state_and_xs):
    state, xs_i = state_and_xs
    blk = nnx.merge(graphdef, state)
    y, ys_i = body(blk, y, xs_i)
    return y, (ys_i, nnx.state(blk, nnx.RngState))

  x, (ys, rng) = jax.lax.scan(jax.checkpoint(step) if remat else step, x, (stacked, xs))
  for i, block in enumerate(blocks):
    nnx.update(block, jax.tree.map(lambda a, i=i: a[i], rng))
  return x, ys


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis; plus_one (Gemma) multiplies by (1 + scale), scale init 0."""

  def __init__(self, dim: int, eps: float, param_dtype: Any, plus_one: bool = False):
    self.eps, self.plus_one = eps, plus_one
    init = jnp.zeros if plus_one else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype), axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps, self.plus_one)


def make_norm(cfg: ml_collections.ConfigDict, dim: int | None = None) -> RMSNorm:
  """The model's RMSNorm over dim (default d_model) in its scale convention."""
  return RMSNorm(cfg.d_model if dim is None else dim, cfg.norm_eps, as_dtype(cfg.param_dtype),
                 configs_lib.Arch.of(cfg).norm_scale == "1+w")


class Embed(nnx.Module):
  """Token embedding; scale (Gemma: sqrt(d_model)) multiplies it in the compute dtype."""

  def __init__(self, vocab: int, dim: int, *, std: float, param_dtype: Any, rngs: nnx.Rngs,
               scale: float = 1.0):
    table = std * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)
    self.embedding = nnx.Param(table.astype(param_dtype), axes=("vocab", "embed"))
    self.scale = scale

  def __call__(self, tokens_BxL: jax.Array, dtype) -> jax.Array:
    table = constrain_logical(self.embedding[...], ("vocab", None))   # gather the fsdp shards
    x = jnp.take(table, tokens_BxL, axis=0).astype(dtype)
    return x if self.scale == 1.0 else x * jnp.asarray(self.scale, dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    arch = configs_lib.Arch.of(cfg)
    d, h, g, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, arch.head_dim
    self.n_heads, self.n_kv_heads, self.head_dim = h, g, hd
    self.rope_theta = cfg.rope_theta
    self.rope_local_theta = arch.rope_local_theta   # 0: local layers use the global rope
    self.sliding_window = arch.sliding_window
    self.scale = arch.attn_scale
    self.perf = cfg.perf
    self.rope_scaling = rope_scaling_of(cfg)
    pdt = as_dtype(cfg.param_dtype)
    kw = dict(dtype=as_dtype(cfg.dtype), param_dtype=pdt,
              init_std=cfg.init_std, backward=cfg.perf.matmul_backward, rngs=rngs)
    self.q = make_linear(cfg.linear, d, h * hd, axes=("embed", "heads"), **kw)
    self.k = make_linear(cfg.linear, d, g * hd, axes=("embed", "kv_heads"), **kw)
    self.v = make_linear(cfg.linear, d, g * hd, axes=("embed", "kv_heads"), **kw)
    self.o = make_linear(cfg.linear, h * hd, d, axes=("heads", "embed"), **kw)
    bias = lambda n, axis: (nnx.Param(jnp.zeros((n,), pdt), axes=(axis,)) if arch.qkv_bias
                            else None)
    self.q_bias, self.k_bias = bias(h * hd, "heads"), bias(g * hd, "kv_heads")
    self.v_bias = bias(g * hd, "kv_heads")
    self.q_norm = make_norm(cfg, hd) if arch.qk_norm else None
    self.k_norm = make_norm(cfg, hd) if arch.qk_norm else None

  def rope(self, positions_BxL: jax.Array, local: int | jax.Array):
    """cos, sin [B, L, 1, hd] of a global (local=0) or local (1; traced under a scan) layer."""
    cos, sin = rope_tables(positions_BxL, self.head_dim, self.rope_theta, self.rope_scaling)
    if self.rope_local_theta and not is_global(local):
      cos_l, sin_l = rope_tables(positions_BxL, self.head_dim, self.rope_local_theta)
      cos, sin = jnp.where(local, cos_l, cos), jnp.where(local, sin_l, sin)
    return cos, sin

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, *, channels=DENSE,
               cache: LayerCache | None = None, rows_from: int = 0,
               local: int | jax.Array = 0):
    """[B, L, D] -> [B, L, D]; with a cache, (y, LayerCache with this step's keys written).

    rows_from (static): keys and values of every position, queries too, but the output
    projection runs on positions >= rows_from only: y is [B, L - rows_from, D], computed
    densely (the caller's plan runs those rows dense: `dense_from`).
    local: 1 for a sliding-window layer (its window and RoPE base), 0 for a global one; a
    python int, or a traced int32 under a layer scan.
    """
    b, length, _ = x_BxLxD.shape
    hd = self.head_dim
    proj = channels.attention_projection(self, x_BxLxD)
    bias = lambda p: None if p is None else p[...]
    q = proj("q", self.q, x_BxLxD, bias(self.q_bias)).reshape(b, length, self.n_heads, hd)
    k = proj("k", self.k, x_BxLxD, bias(self.k_bias)).reshape(b, length, self.n_kv_heads, hd)
    v = proj("v", self.v, x_BxLxD, bias(self.v_bias)).reshape(b, length, self.n_kv_heads, hd)
    if self.q_norm is not None:
      q, k = self.q_norm(q).astype(q.dtype), self.k_norm(k).astype(k.dtype)
    cos, sin = self.rope(positions_BxL, local)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    window = self.sliding_window * local
    if cache is None:
      out = attention_core(self.perf, q, k, v, segment_ids_BxL, window=window,
                           scale=self.scale)
    else:
      k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype),
                                                  cache.start, 1)
      v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype),
                                                  cache.start, 1)
      slots = k_all.shape[1]
      q_slot = cache.start + jnp.arange(length)
      mask = q_slot[:, None] >= jnp.arange(slots)[None, :]
      if not is_global(window):   # slot distance = position distance within a sequence
        mask = mask & window_mask(q_slot[:, None], jnp.arange(slots)[None, :], window)
      mask = mask[None] & cache.valid[:, None, :]
      out = cache_attention(q, k_all, v_all, mask, self.scale)
      cache = cache._replace(k=k_all, v=v_all)
    out = out.reshape(b, length, self.n_heads * hd)
    if rows_from:
      y = dense_projection("o", self.o, out[:, rows_from:])
    else:
      y = proj("o", self.o, out)
    return y if cache is None else (y, cache)


class MLP(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    kw = dict(dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
              init_std=cfg.init_std, backward=cfg.perf.matmul_backward, rngs=rngs)
    d, f = cfg.d_model, cfg.ffn_dim
    self.activation = configs_lib.Arch.of(cfg).mlp_activation
    self.gate = make_linear(cfg.linear, d, f, axes=("embed", "mlp"), **kw)
    self.up = make_linear(cfg.linear, d, f, axes=("embed", "mlp"), **kw)
    self.down = make_linear(cfg.linear, f, d, axes=("mlp", "embed"), **kw)

  def __call__(self, x_BxLxD):
    return self.down(gated(self.gate(x_BxLxD), self.up(x_BxLxD), self.activation))


class Block(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.dtype = as_dtype(cfg.dtype)
    post = configs_lib.Arch.of(cfg).post_norms
    self.attn_norm = make_norm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.attn_post_norm = make_norm(cfg) if post else None
    self.mlp_norm = make_norm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)
    self.mlp_post_norm = make_norm(cfg) if post else None

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, *, channels=DENSE,
               cache: LayerCache | None = None, rows_from: int = 0,
               local: int | jax.Array = 0):
    """[B, L, D] -> [B, L - rows_from, D] (and the updated LayerCache when one is given).

    rows_from (static, >= channels.dense_from()): past attention, which reads every
    position's keys and values, only positions >= rows_from are computed (dense).
    local: this layer's sliding-window flag (`Attention`).
    """
    h = self.attn_norm(x_BxLxD).astype(self.dtype)
    a = self.attn(h, positions_BxL, segment_ids_BxL, channels=channels, cache=cache,
                  rows_from=rows_from, local=local)
    if cache is not None:
      a, cache = a
    if self.attn_post_norm is not None:
      a = self.attn_post_norm(a)
    x = x_BxLxD[:, rows_from:] + a.astype(x_BxLxD.dtype)
    h = self.mlp_norm(x).astype(self.dtype)
    mlp = self.mlp(h) if rows_from else channels.mlp(self.mlp, h)
    if self.mlp_post_norm is not None:
      mlp = self.mlp_post_norm(mlp)
    x = x + mlp.astype(x.dtype)
    return x if cache is None else (x, cache)


ATTN_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")


def projection_owner(block: Block, name: str) -> nnx.Module:
  """The Attention (q, k, v, o) or MLP (gate, up, down) of a block holding projection `name`."""
  if name in ATTN_PROJECTIONS:
    return block.attn
  if name in MLP_PROJECTIONS:
    return block.mlp
  raise ValueError(f"projection {name!r} is unknown. "
                   f"Fix: use names from {ATTN_PROJECTIONS + MLP_PROJECTIONS}.")


def projection(block: Block, name: str):
  """The linear layer `name` (q, k, v, o, gate, up or down) of a block."""
  return getattr(projection_owner(block, name), name)


class Llama(nnx.Module):
  """tokens [B, L] -> float32 logits [B, L, V]."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    configs_lib.validate_model(cfg)
    cfg = configs_lib.with_resolved_perf(cfg)
    self.cfg = cfg
    self.dtype = as_dtype(cfg.dtype)
    pdt = as_dtype(cfg.param_dtype)
    arch = configs_lib.Arch.of(cfg)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, param_dtype=pdt,
                       rngs=rngs, scale=cfg.d_model ** 0.5 if arch.embed_scale else 1.0)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    # Per-layer sliding-window flags: python ints when every layer agrees (no traced flag).
    self.local = arch.local_layers(cfg.n_layers)
    self.final_norm = make_norm(cfg)
    self.lm_head = DenseLinear(cfg.d_model, cfg.vocab_size, dtype=self.dtype, param_dtype=pdt,
                               init_std=cfg.init_std, axes=("embed", "vocab"),
                               backward=cfg.perf.matmul_backward, rngs=rngs)

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, *, logits_from: int = 0,
               channels=None, cache: Cache | None = None, head: bool = True):
    """Float32 logits [B, L - logits_from, V]; with a cache, (logits, updated Cache).

    logits_from (static): the LM head runs on positions >= logits_from only (training needs
    the loss positions, decoding the last one). channels: one plan per layer (default dense).
    head=False returns the final-normed hidden states [B, L - logits_from, D] (compute dtype)
    instead of logits, for a loss that applies `lm_head.kernel` itself
    (`losses.fused_cross_entropy`).
    """
    b, length = tokens_BxL.shape
    if not isinstance(logits_from, int) or not 0 <= logits_from < length:
      raise ValueError(f"logits_from={logits_from!r} must be a python int in 0..{length - 1}.")
    if channels is not None and len(channels) != len(self.layers):
      raise ValueError(f"{len(channels)} channel plans for {len(self.layers)} layers.")
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length), (b, length))
    scan = self.cfg.perf.layer_loop == "scan"
    if scan and channels is not None:
      raise ValueError("layer_loop='scan' cannot run per-layer channel plans (their static "
                       "channel counts differ by layer). Fix: model.perf.layer_loop='unrolled'.")
    if cache is not None and scan != (len(cache.kv) == 2 and hasattr(cache.kv[0], "ndim")):
      raise ValueError("the Cache layout does not match model.perf.layer_loop. Fix: build it "
                       "with Cache.zeros(model.cfg, ...).")

    def layer(blk, y, ch, kv, local, rows_from=0):
      """One block on the residual stream y; kv: this layer's (k, v) cache or None."""
      lc = None if kv is None else LayerCache(*kv, cache.start, cache.valid)
      y = blk(y, positions_BxL, segment_ids_BxL, channels=ch, cache=lc, rows_from=rows_from,
              local=local)
      if lc is not None:
        y, lc = y
      return constrain_batch(y), (None if lc is None else (lc.k, lc.v))  # split by batch

    # Decoding has no backward pass to save memory for: remat is for training only.
    remat = self.cfg.remat and cache is None
    # The residual stream stays in the compute dtype; blocks normalise in float32.
    x = constrain_batch(self.embed(tokens_BxL, self.dtype))
    if scan:
      # A mixed local/global stack scans its per-layer flags with the blocks.
      mixed = len(set(self.local)) > 1
      flags = jnp.asarray(self.local, jnp.int32) if mixed else None
      x, kv = scan_blocks(
          self.layers,
          lambda blk, y, xs: layer(blk, y, DENSE, xs[0], xs[1] if mixed else self.local[0]),
          x, (None if cache is None else cache.kv, flags), remat=remat)
    else:
      kv = []
      for i, block in enumerate(self.layers):
        ch = DENSE if channels is None else channels[i]
        # Only positions >= logits_from of the last block's output are read: past its
        # attention it runs on those rows, if its plan runs them dense (a plan without
        # `dense_from` runs every row).
        dense_from = getattr(ch, "dense_from", lambda: length)()
        last = i == len(self.layers) - 1 and dense_from <= logits_from
        rows = logits_from if last else 0
        local = self.local[i]
        if remat:
          x = remat_call(lambda blk, y, ch=ch, rows=rows, local=local:
                         layer(blk, y, ch, None, local, rows)[0], block, x)
        else:
          x, kv_i = layer(block, x, ch, None if cache is None else cache.kv[i], local, rows)
          kv.append(kv_i)
      kv = tuple(kv)
    x = x[:, logits_from - (length - x.shape[1]):]          # the rows left from logits_from
    h = self.final_norm(x).astype(self.dtype)
    # float32 logits; in bf16 the head's three matmuls take bf16 operands (layers.matmul).
    logits = h if not head else matmul(h, self.lm_head.kernel[...], self.dtype,
                                       out_dtype=jnp.float32,
                                       backward=self.cfg.perf.matmul_backward)
    return logits if cache is None else (logits, cache._replace(kv=kv))
