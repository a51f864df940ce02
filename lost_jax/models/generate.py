"""Greedy decoding with a KV cache for left-padded prompts (used by fine-tuning eval).

Prefill and every decode step run the model's own forward (`Llama.__call__` with a `Cache`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax.models.llama import Cache, Llama


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def greedy_generate(model: Llama, prompts_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                    max_new_tokens: int) -> jax.Array:
  """Greedy continuation [B, max_new_tokens] of left-padded prompts (mask 1 on real tokens)."""
  b, p = prompts_BxP.shape
  prompt_mask = prompt_mask_BxP.astype(bool)
  valid = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
  cache = Cache.zeros(model.cfg, b, p + max_new_tokens, valid, model.dtype)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  logits, cache = model(prompts_BxP, positions, logits_from=p - 1, cache=cache)
  next_pos = positions[:, -1] + 1
  token = jnp.argmax(logits[:, -1], axis=-1).astype(prompts_BxP.dtype)

  def step(carry, i):
    token, cache = carry
    logits, cache = model(token[:, None], (next_pos + i)[:, None],
                          cache=cache._replace(start=p + i))
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(token.dtype)
    return (nxt, cache), token

  (_, _), tokens = jax.lax.scan(step, (token, cache), jnp.arange(max_new_tokens))
  return tokens.T
