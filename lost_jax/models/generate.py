"""Decoding with a KV cache for left-padded prompts: greedy or temperature / top-p sampling,
each row stopping at its first stop token (EOS, a chat template's end of turn).

Prefill and every decode step run the model's own forward (`Llama.__call__` with a `Cache`).
The decode loop is a `lax.while_loop` that ends once every row has stopped (or after
max_new_tokens); positions after a row's stop token hold `pad_id`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax.models.llama import Cache, Llama


def top_p_logits(logits_BxV: jax.Array, top_p: float) -> jax.Array:
  """Logits with every token outside the nucleus set to -inf: the smallest set of most likely
  tokens whose probability reaches top_p (the most likely token is always kept)."""
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = mass_before_BxV < top_p
  threshold_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
  return jnp.where(logits_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)


def next_token(logits_BxV: jax.Array, key: jax.Array, temperature: float,
               top_p: float) -> jax.Array:
  """Token ids [B]: the argmax at temperature 0, else a sample of softmax(logits / T)
  restricted to the top_p nucleus."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    logits_BxV = top_p_logits(logits_BxV, top_p)
  return jax.random.categorical(key, logits_BxV, axis=-1)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "stop_ids", "pad_id",
                                             "temperature", "top_p"))
def generate(model: Llama, prompts_BxP: jax.Array, prompt_mask_BxP: jax.Array,
             max_new_tokens: int, *, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None) -> jax.Array:
  """New tokens [B, max_new_tokens] continuing left-padded prompts (mask 1 on real tokens).

  A row's first token in `stop_ids` is kept and followed by `pad_id`; decoding ends when
  every row has stopped. temperature 0 is greedy (`key` unused); otherwise `key` seeds the
  sampling (the same key gives the same tokens).
  """
  b, p = prompts_BxP.shape
  key = jax.random.key(0) if key is None else key
  prompt_mask = prompt_mask_BxP.astype(bool)
  valid = jnp.concatenate([prompt_mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
  cache = Cache.zeros(model.cfg, b, p + max_new_tokens, valid, model.dtype)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  logits, cache = model(prompts_BxP, positions, logits_from=p - 1, cache=cache)
  next_pos = positions[:, -1] + 1
  stops = jnp.asarray(stop_ids if stop_ids else (-1,), prompts_BxP.dtype)

  def pick(logits_BxV, i):
    return next_token(logits_BxV, jax.random.fold_in(key, i), temperature,
                      top_p).astype(prompts_BxP.dtype)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, cache, done, out_BxN = carry
    token = jnp.where(done, pad_id, token)
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, token[:, None], (0, i))
    done = done | jnp.isin(token, stops)
    logits, cache = model(token[:, None], (next_pos + i)[:, None],
                          cache=cache._replace(start=p + i))
    return i + 1, pick(logits[:, -1], i + 1), cache, done, out_BxN

  out_BxN = jnp.full((b, max_new_tokens), pad_id, prompts_BxP.dtype)
  carry = (jnp.zeros((), jnp.int32), pick(logits[:, -1], 0), cache, jnp.zeros((b,), bool),
           out_BxN)
  return jax.lax.while_loop(cond, body, carry)[-1]


def greedy_generate(model: Llama, prompts_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                    max_new_tokens: int, *, stop_ids: tuple[int, ...] = (),
                    pad_id: int = 0) -> jax.Array:
  """Greedy continuation [B, max_new_tokens] of left-padded prompts (mask 1 on real tokens)."""
  return generate(model, prompts_BxP, prompt_mask_BxP, max_new_tokens,
                  stop_ids=tuple(int(i) for i in stop_ids), pad_id=int(pad_id))
