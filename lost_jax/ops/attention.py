"""Causal attention kernels selected by `model.perf.attention`: blocked XLA ops, jax.nn's
dot_product_attention (cuDNN on GPU), the TPU Pallas splash kernel, and KV-cache attention."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lost_jax import configs as configs_lib
from lost_jax.ops.matmul import batched_matmul
from lost_jax.parallel.sharding import BATCH


def is_global(window: int | jax.Array) -> bool:
  """Whether a layer's window is statically 0 (global attention: no window mask at all)."""
  return isinstance(window, int) and window == 0


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | jax.Array) -> jax.Array:
  """True where key position k_pos is one of the `window` latest keys of query q_pos (itself
  included: HF's kv > q - window); every key where window is 0 (a traced global layer)."""
  return (q_pos - k_pos < window) | (window == 0)


def attention_mask(segment_ids_BxL: jax.Array | None, length: int,
                   q_start: int = 0, q_len: int | None = None,
                   window: int | jax.Array = 0) -> jax.Array:
  """Causal mask [B or 1, 1, Lq, L], also blocking attention across packed documents and,
  with a window (local layers), keys more than window - 1 positions back."""
  q_len = length if q_len is None else q_len
  q_pos = q_start + jnp.arange(q_len)[:, None]
  k_pos = jnp.arange(length)[None, :]
  mask = q_pos >= k_pos
  if not is_global(window):
    mask = mask & window_mask(q_pos, k_pos, window)
  mask = mask[None, None]
  if segment_ids_BxL is not None:
    seg_q = jax.lax.dynamic_slice_in_dim(segment_ids_BxL, q_start, q_len, axis=1)
    mask = mask & (seg_q[:, None, :, None] == segment_ids_BxL[:, None, None, :])
  return mask


def attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
              segment_ids_BxL: jax.Array | None, q_block: int = 128,
              backward: str = "xla", window: int | jax.Array = 0,
              scale: float | None = None) -> jax.Array:
  """Causal GQA attention (query head h uses kv head h // (H / G)); softmax in f32; [B,L,H,K].

  window: keys a query sees (local layers; 0: all); scale: of the scores (None: K ** -0.5).

  Queries run in blocks of q_block positions, each against the keys up to its last position
  only: the fully masked (future) key blocks are never computed, ~(n+1)/2n of the L x L
  scores for n blocks. Heads sharing a kv head are stacked into one [G, R*q_block, K] matmul
  operand so every matmul is a plain (batched) A @ B^T or A @ B. The softmax is normalised
  after the PV matmul, whose value operand carries a column of ones that yields the row sums:
  the only [q, keys]-sized reduction left is the max, and the backward needs none. Both
  products are `layers.batched_matmul` (compute-dtype operands, float32 results, `backward`
  as model.perf.matmul_backward).
  """
  b, length, h, hd = q_BxLxHxK.shape
  g = k_BxLxGxK.shape[2]
  r = h // g
  # Scaling q (L x H x K values) is cheaper than scaling the scores (L x L x H).
  q = q_BxLxHxK * jnp.asarray(hd ** -0.5 if scale is None else scale, q_BxLxHxK.dtype)
  q = q.reshape(b, length, g, r, hd).transpose(0, 2, 3, 1, 4)             # [B,G,R,L,K]
  k = k_BxLxGxK.transpose(0, 2, 1, 3)                                     # [B,G,L,K]
  v = v_BxLxGxK.transpose(0, 2, 1, 3)
  v1 = jnp.concatenate([v, jnp.ones((b, g, length, 1), v.dtype)], axis=-1)  # [B,G,L,K+1]
  starts = range(0, length, q_block)
  # One split, not a slice per block: its transpose concatenates the blocks' query gradients
  # where the slices' would pad each to full length and add them.
  q_blocks = jax.lax.split(q, [min(length, s + q_block) - s for s in starts], axis=3)
  outs = []
  for start, q_blk in zip(starts, q_blocks):
    n = q_blk.shape[3]
    stop = start + n
    q_blk = q_blk.reshape(b, g, r * n, hd)
    scores = batched_matmul(q_blk, k[:, :, :stop], transpose_b=True, backward=backward
                            ).reshape(b, g, r, n, stop)
    seg = None if segment_ids_BxL is None else segment_ids_BxL[:, :stop]
    mask = attention_mask(seg, stop, start, n, window)[:, :, None]              # [B,1,1,n,stop]
    # An additive mask: its gradient is the identity (exp() already zeroes masked entries),
    # where a select would cost one more [q, keys]-sized pass in the backward.
    scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - row_max).astype(v.dtype).reshape(b, g, r * n, stop)
    out1 = batched_matmul(weights, v1[:, :, :stop], transpose_b=False,
                          backward=backward)                           # [B,G,R*n,K+1] f32
    out = out1[..., :hd] / out1[..., hd:]
    outs.append(out.astype(v.dtype).reshape(b, g, r, n, hd))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)    # [B,G,R,L,K]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, hd)


def dot_product_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                          segment_ids_BxL: jax.Array | None,
                          implementation: str | None = None, window: int | jax.Array = 0,
                          scale: float | None = None) -> jax.Array:
  """Causal GQA attention through `jax.nn.dot_product_attention` (fused kernels), [B,L,H,K].

  implementation None lets jax choose; 'cudnn' is GPU flash attention, 'xla' runs anywhere.
  Packed segments and a window (local layers; possibly traced, in a layer scan) become a
  [B or 1, 1, L, L] mask (which the cuDNN kernel may refuse).
  """
  mask = None
  if segment_ids_BxL is not None:
    mask = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
  if not is_global(window):
    length = q_BxLxHxK.shape[1]
    near = window_mask(jnp.arange(length)[:, None], jnp.arange(length)[None, :], window)
    mask = near[None, None] if mask is None else mask & near[None, None]
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask,
                                      is_causal=True, scale=scale,
                                      implementation=implementation)


SPLASH_LANE = 128     # the TPU kernel's sequence blocks are multiples of 128 positions


def splash_block(length: int) -> int:
  """Splash block size for a sequence padded to a multiple of SPLASH_LANE: the largest of
  512 / 256 / 128 dividing it."""
  return next(b for b in (512, 256, SPLASH_LANE) if length % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(n_heads: int, length: int, interpret: bool):
  """jax's TPU splash-attention kernel for a causal [n_heads, length, length] mask.

  Built outside any trace (ensure_compile_time_eval): the kernel holds its mask's block
  tables as arrays and is cached, so tables made inside one jit's trace would leak into the
  next call (an UnexpectedTracerError whenever the first use was under jit).
  """
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  block = splash_block(length)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((length, length))] * n_heads)
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def splash_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                     segment_ids_BxL: jax.Array | None, interpret: bool = False,
                     scale: float | None = None) -> jax.Array:
  """Causal GQA attention through jax's Pallas TPU splash kernel, [B, L, H, K].

  The sequence is padded at the end to a multiple of SPLASH_LANE (causality keeps real
  queries off the padded keys; padded rows are dropped). Packed segments go to the kernel as
  segment ids. Under a mesh with batch axes the kernel runs per batch shard (shard_map):
  a Pallas call is not partitioned by the compiler. interpret=True runs the Pallas
  interpreter (any backend; tests).
  """
  b, length, h, hd = q_BxLxHxK.shape
  padded = -(-length // SPLASH_LANE) * SPLASH_LANE
  kernel = _splash_kernel(h, padded, interpret)

  def per_shard(q, k, v, seg):
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    q = jnp.pad(q * jnp.asarray(hd ** -0.5 if scale is None else scale, q.dtype), pad).transpose(0, 2, 1, 3)  # [B,H,L,K]
    k, v = (jnp.pad(a, pad).transpose(0, 2, 1, 3) for a in (k, v))
    if seg is None:
      out = jax.vmap(kernel)(q, k, v)
    else:
      seg = jnp.pad(seg, [(0, 0), (0, padded - length)])
      out = jax.vmap(lambda qq, kk, vv, ss: kernel(qq, kk, vv, segment_ids=_segments(ss, ss))
                     )(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :length]

  mesh = jax.sharding.get_abstract_mesh()
  shards = 0 if mesh.empty or not set(BATCH) <= set(mesh.axis_names) else math.prod(
      mesh.shape[a] for a in BATCH)
  if shards <= 1 or b % shards:
    return per_shard(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
  spec = jax.sharding.PartitionSpec(BATCH)
  seg_spec = None if segment_ids_BxL is None else spec
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec, seg_spec),
                       out_specs=spec, check_vma=False)(
                           q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)


def _segments(q_ids, kv_ids):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  return sk.SegmentIds(q_ids, kv_ids)


def attention_core(perf, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, *,
                   window: int | jax.Array = 0, scale: float | None = None) -> jax.Array:
  """The attention kernel named by perf.attention (resolved), [B, L, H, K].

  window: keys each query sees (a local layer; 0: all); scale: of the scores (None: K**-0.5).
  """
  if perf.attention == "blocked":
    return attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL,
                     backward=perf.matmul_backward, window=window, scale=scale)
  if perf.attention == "dot_product_attention":
    impl = None if perf.attention_impl == "auto" else perf.attention_impl
    return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, impl,
                                 window=window, scale=scale)
  if perf.attention == "splash":
    if not is_global(window):
      raise ValueError("model.perf.attention='splash' has no sliding-window layers. Fix: "
                       "model.perf.attention='blocked' or 'dot_product_attention'.")
    return splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL,
                            interpret=perf.attention_impl == "interpret", scale=scale)
  raise ValueError(f"model.perf.attention={perf.attention!r} is unresolved or unknown. "
                   f"Fix: one of {configs_lib.ATTENTIONS} (configs.resolve_perf).")


def cache_attention(q_BxTxHxK, k_cache_BxSxGxK, v_cache_BxSxGxK, mask_BxTxS,
                    scale: float | None = None) -> jax.Array:
  """Attention of T new queries over an S-slot cache (GQA), softmax in float32, [B,T,H,K]."""
  b, t, h, hd = q_BxTxHxK.shape
  g = k_cache_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(b, t, g, h // g, hd)
  scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_cache_BxSxGxK,
                      preferred_element_type=jnp.float32) * (hd ** -0.5 if scale is None
                                                             else scale)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache_BxSxGxK.dtype)
  return jnp.einsum("bgrts,bsgk->btgrk", probs, v_cache_BxSxGxK).reshape(b, t, h, hd)
