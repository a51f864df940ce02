"""Greedy decoding with a KV cache for left-padded prompts (used by fine-tuning eval)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax.model import Llama, apply_rope, rms_norm, rope_scaling_of, rope_tables


def _attend(q_BxTxHxK, k_cache_BxSxGxK, v_cache_BxSxGxK, mask_BxTxS):
  """Attention of T new queries over an S-slot cache (GQA), softmax in float32."""
  b, t, h, hd = q_BxTxHxK.shape
  g = k_cache_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(b, t, g, h // g, hd)
  scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_cache_BxSxGxK,
                      preferred_element_type=jnp.float32) * (hd ** -0.5)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache_BxSxGxK.dtype)
  return jnp.einsum("bgrts,bsgk->btgrk", probs, v_cache_BxSxGxK).reshape(b, t, h, hd)


def _forward_cached(model: Llama, tokens_BxT, positions_BxT, start: int | jax.Array,
                    cache, valid_BxS):
  """Run T tokens written at cache slots [start, start + T); return logits and new cache."""
  cfg = model.cfg
  b, t = tokens_BxT.shape
  hd = cfg.d_model // cfg.n_heads
  slots = cache[0][0].shape[1]
  cos, sin = rope_tables(positions_BxT, hd, cfg.rope_theta, rope_scaling_of(cfg))
  q_slot = start + jnp.arange(t)
  mask = (q_slot[:, None] >= jnp.arange(slots)[None, :])[None] & valid_BxS[:, None, :]
  x = model.embed(tokens_BxT, model.dtype)
  new_cache = []
  for block, (k_cache, v_cache) in zip(model.layers, cache):
    attn = block.attn
    h = block.attn_norm(x).astype(model.dtype)
    q = apply_rope(attn.q(h).reshape(b, t, attn.n_heads, hd), cos, sin)
    k = apply_rope(attn.k(h).reshape(b, t, attn.n_kv_heads, hd), cos, sin)
    v = attn.v(h).reshape(b, t, attn.n_kv_heads, hd)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
    out = _attend(q, k_cache, v_cache, mask)
    x = x + attn.o(out.reshape(b, t, -1)).astype(x.dtype)
    x = x + block.mlp(block.mlp_norm(x).astype(model.dtype)).astype(x.dtype)
    new_cache.append((k_cache, v_cache))
  h = rms_norm(x, model.final_norm.scale[...], cfg.norm_eps).astype(model.dtype)
  logits = jnp.einsum("btd,dv->btv", h, model.lm_head.kernel[...].astype(model.dtype),
                      preferred_element_type=jnp.float32)
  return logits, new_cache


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def greedy_generate(model: Llama, prompts_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                    max_new_tokens: int) -> jax.Array:
  """Greedy continuation [B, max_new_tokens] of left-padded prompts (mask 1 on real tokens)."""
  cfg = model.cfg
  b, p = prompts_BxP.shape
  hd = cfg.d_model // cfg.n_heads
  slots = p + max_new_tokens
  shape = (b, slots, cfg.n_kv_heads, hd)
  cache = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
           for _ in range(cfg.n_layers)]
  prompt_mask = prompt_mask_BxP.astype(bool)
  valid = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  logits, cache = _forward_cached(model, prompts_BxP, positions, 0, cache, valid)
  next_pos = positions[:, -1] + 1
  token = jnp.argmax(logits[:, -1], axis=-1).astype(prompts_BxP.dtype)

  def step(carry, i):
    token, cache = carry
    logits, cache = _forward_cached(model, token[:, None], (next_pos + i)[:, None], p + i,
                                    cache, valid)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(token.dtype)
    return (nxt, cache), token

  (_, _), tokens = jax.lax.scan(step, (token, cache), jnp.arange(max_new_tokens))
  return tokens.T
