"""Learning-rate schedule and optimizers (AdamW, GaLore, 8-bit variants) over an nnx.State."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lost_jax.ops import quant
from lost_jax.configs import OPTIMIZERS
from lost_jax.errors import UserError

MIN_8BIT_SIZE = 4096     # smaller moments stay unquantised (bitsandbytes' min_8bit_size).


def schedule_steps(train: ml_collections.ConfigDict) -> int:
  """The steps the lr schedule spans: train.steps, or on a resumed run the length
  `train.extend` kept (`runtime.open_workdir` records it as train.schedule_steps)."""
  return int(train.get("schedule_steps") or train.steps)


def lr_schedule(train: ml_collections.ConfigDict, steps: int | None = None) -> optax.Schedule:
  """Linear warmup to train.lr over warmup_frac of the schedule's steps (`schedule_steps`, or
  `steps`), cosine decay to min_lr_ratio * lr at its end, then held there."""
  steps = schedule_steps(train) if steps is None else steps
  warmup = max(1, int(train.warmup_frac * steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=train.lr * train.min_lr_ratio)


def _paths(params: nnx.State):
  """Tree (same structure as params) of '/'-joined parameter paths."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
      params)


def decay_mask(params: nnx.State, decay_norms_and_embeddings: bool):
  """True where weight decay applies: every parameter, or all but norm scales and embeddings."""
  if decay_norms_and_embeddings:
    return jax.tree.map(lambda _: True, params)
  return jax.tree.map(lambda p: not (p.endswith("scale") or p.endswith("embedding")),
                      _paths(params))


def galore_labels(params: nnx.State):
  """'galore' for 2-D kernels inside blocks (attention and MLP), 'adam' for everything else."""
  return jax.tree.map(lambda p: "galore" if p.startswith("layers/") and p.endswith("kernel")
                      else "adam", _paths(params))


class ScaleByAdam8bitState(NamedTuple):
  """Adam moments, block-quantised: mu and nu hold uint8 codes (param shape) for tensors of at
  least MIN_8BIT_SIZE values, else the unquantised moment; *_scale hold float32 block scales
  [*shape[:-1], n_blocks] (a float32 scalar 1 for unquantised moments)."""
  count: jax.Array
  mu: optax.Updates
  mu_scale: optax.Updates
  nu: optax.Updates
  nu_scale: optax.Updates


def leading_shards(param_shardings) -> dict[str, int]:
  """{parameter path: devices its leading axis is split over} of a tree of NamedShardings."""
  def count(sh) -> int:
    spec = getattr(sh, "spec", ())
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    return math.prod(sh.mesh.shape[a] for a in axes)
  return dict(zip(jax.tree.leaves(_paths(param_shardings)), map(count, jax.tree.leaves(
      param_shardings))))


def in_row_chunks(fn, g, state: tuple, chunk_values: int, shards: int = 1) -> tuple:
  """fn(g, *state) for a row-wise fn whose outputs have state's shapes, computed in place.

  g [n, ...] and every state array [n, ...] are split into `shards` groups of leading rows
  (the rows a device holds when the leading axis is sharded `shards` ways), and a fori_loop
  updates `rows` rows of every group per iteration with dynamic_update_slice into the carried
  state: with the state donated, the new state is written over the old one, and fn's
  workspace is one chunk's (about chunk_values values per device). 0: all rows at once.
  """
  n = g.shape[0]
  shards = shards if shards > 1 and n % shards == 0 else 1
  local = n // shards
  rows = max(1, chunk_values // max(1, g.size // n)) if chunk_values else local
  if g.ndim < 2 or rows >= local:
    return tuple(fn(g, *state))
  split = lambda x: x.reshape(shards, local, *x.shape[1:])
  g, state = split(g), tuple(map(split, state))

  def chunk(start, size, st):
    piece = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, 1)
    new = fn(piece(g), *map(piece, st))
    return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, start, 1) for x, y in zip(st, new))

  full = local // rows
  state = jax.lax.fori_loop(0, full, lambda i, st: chunk(i * rows, rows, st), state)
  if local % rows:
    state = chunk(full * rows, local % rows, state)
  return tuple(x.reshape(n, *x.shape[2:]) for x in state)


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       min_8bit_size: int = MIN_8BIT_SIZE,
                       block: int = quant.STATE_BLOCK, mu_dtype=None,
                       chunk_values: int = 2 ** 20,
                       shards: dict[str, int] | None = None) -> optax.GradientTransformation:
  """optax.scale_by_adam with 8-bit block-wise moments (dequantise, update, requantise per step).

  mu is stored under the signed dynamic map; the second moment is stored as sqrt(nu) under the
  unsigned dynamic map: the square root halves nu's dynamic range (which reaches 1e-14 of the
  block max for rarely-seen embedding rows), and sqrt(nu) is what divides the update, so its
  relative error is the update's. Small moments (< min_8bit_size values) stay in mu_dtype.

  Memory: the update is elementwise in the gradient and the stored codes, so it fuses into
  the parameter update and is never a tensor-sized buffer; the new codes and scales (which
  need each block's absmax) are written over the old ones `in_row_chunks` of about
  `chunk_values` values (0: whole tensors at once). `shards` ({parameter path: devices its
  leading axis is split over}, `leading_shards`) makes every chunk take rows of every shard,
  so no device gathers another's rows.
  """
  shards = shards or {}

  def quantised(p) -> bool:
    return p.ndim >= 1 and p.size >= min_8bit_size

  def init_fn(params):
    def zeros(p, signed):   # (codes, scales) of a zero moment: the index of 0.0, scales 1.
      if quantised(p):
        zero = int(np.flatnonzero(quant.dynamic_codebook(signed) == 0.0)[0])
        return (jnp.full(p.shape, zero, jnp.uint8),
                jnp.ones((*p.shape[:-1], -(-p.shape[-1] // block)), jnp.float32))
      return jnp.zeros(p.shape, mu_dtype or p.dtype), jnp.ones((), jnp.float32)

    mu = jax.tree.map(lambda p: zeros(p, True)[0], params)
    mu_s = jax.tree.map(lambda p: zeros(p, True)[1], params)
    nu = jax.tree.map(lambda p: zeros(p, False)[0], params)
    nu_s = jax.tree.map(lambda p: zeros(p, False)[1], params)
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, mu_s, nu, nu_s)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)

    def moments(g, mu, mu_s, nu, nu_s):
      """New float32 (m, v): elementwise in the stored moments and the gradient."""
      q = mu.dtype == jnp.uint8
      g32 = g.astype(jnp.float32)
      m = quant.dequantize_blockwise(mu, mu_s, True, block) if q else mu
      v = jnp.square(quant.dequantize_blockwise(nu, nu_s, False, block)) if q else nu
      return (b1 * m.astype(jnp.float32) + (1 - b1) * g32,
              b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g32))

    def requantised(*args):
      m, v = moments(*args)
      return (*quant.quantize_blockwise(m, True, block),
              *quant.quantize_blockwise(jnp.sqrt(v), False, block))

    def one(path, g, mu, mu_s, nu, nu_s):
      m, v = moments(g, mu, mu_s, nu, nu_s)
      u = ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype)
      if mu.dtype != jnp.uint8:
        return u, m.astype(mu.dtype), mu_s, v.astype(nu.dtype), nu_s
      return (u, *in_row_chunks(requantised, g, (mu, mu_s, nu, nu_s), chunk_values,
                                shards.get(path, 1)))

    leaves, treedef = jax.tree.flatten(updates)
    rest = [treedef.flatten_up_to(t) for t in state[1:]]
    paths = jax.tree.leaves(_paths(updates))
    out = [one(*args) for args in zip(paths, leaves, *rest)]
    u, mu, mu_s, nu, nu_s = (treedef.unflatten(list(col)) for col in zip(*out))
    return u, ScaleByAdam8bitState(count, mu, mu_s, nu, nu_s)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, mask=None, mu_dtype=None,
               shards: dict[str, int] | None = None) -> optax.GradientTransformation:
  """optax.adamw with `scale_by_adam_8bit` moments."""
  return optax.chain(scale_by_adam_8bit(b1, b2, eps, mu_dtype=mu_dtype, shards=shards),
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def block_labels(params: nnx.State):
  """True for the projections of the blocks (every parameter under layers/ but the norm
  scales); False for the embedding, LM head and norm scales, which every method shares."""
  return jax.tree.map(lambda p: p.startswith("layers/") and not p.endswith("scale"),
                      _paths(params))


def lr_scale_by_leaf(scales) -> optax.GradientTransformation:
  """Multiply each leaf's update by a fixed Python float (a tree shaped like the params)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype),
                        updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def shared_lr_scales(train: ml_collections.ConfigDict, params: nnx.State):
  """Per-leaf factor shared_lr / lr on shared parameters, 1 on block parameters.

  AdamW's update is -lr(t) * (adam direction + wd * p), so scaling a leaf's update by
  shared_lr / lr gives that leaf AdamW at peak shared_lr under the same schedule shape.
  """
  factor = train.shared_lr / train.lr
  return jax.tree.map(lambda block: 1.0 if block else factor, block_labels(params))


def make_optimizer(train: ml_collections.ConfigDict, params: nnx.State,
                   moment_dtype=None, param_shardings=None) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW (or GaLore on block kernels, AdamW elsewhere).

  The '8bit' variants store Adam's moments block-quantised (`scale_by_adam_8bit`); for GaLore
  both the projected moments and the AdamW moments of the other parameters.
  With train.shared_lr > 0 the embedding, LM head and norm scales train at peak shared_lr
  instead of lr (same schedule shape), so methods can share them while their block lr varies.
  `param_shardings` (NamedShardings like params) lets the 8-bit update chunk rows per shard.
  """
  if train.optimizer not in OPTIMIZERS:
    raise UserError(f"config.train.optimizer={train.optimizer!r} is unknown. "
                    f"Fix: use one of {OPTIMIZERS}.")
  schedule = lr_schedule(train)
  mask = decay_mask(params, train.decay_norms_and_embeddings)
  eight_bit = train.optimizer.endswith("8bit")
  eight = dict(shards=leading_shards(param_shardings)) if eight_bit and param_shardings else {}
  adamw = (adamw_8bit if eight_bit else optax.adamw)(
      schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay,
      mask=mask, mu_dtype=moment_dtype, **eight)
  if train.optimizer in ("adamw", "adamw8bit"):
    opt = adamw
  else:
    make_adam = scale_by_adam_8bit if eight_bit else optax.scale_by_adam
    galore = optax.contrib.galore(
        schedule, rank=train.galore_rank, update_proj_gap=train.galore_update_freq,
        scale=train.galore_scale, weight_decay=train.weight_decay,
        base_optimizer=make_adam(b1=train.b1, b2=train.b2, eps=train.eps,
                                 mu_dtype=moment_dtype))
    opt = optax.partition({"galore": galore, "adam": adamw}, galore_labels(params))
  if train.get("shared_lr", 0.0) > 0:
    opt = optax.chain(opt, lr_scale_by_leaf(shared_lr_scales(train, params)))
  if train.clip_norm > 0:
    opt = optax.chain(clip_by_global_norm(train.clip_norm), opt)
  return opt


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (same math, same empty state) that takes the gradients' global
  norm as the extra argument `grad_norm` when the caller has it: the train step computes it
  for its metrics, and recomputing it inside the update's lax.cond branch is another full
  pass over every gradient (XLA cannot share it across the cond)."""

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    trigger = jnp.squeeze(g_norm < max_norm)
    updates = jax.tree.map(
        lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), updates)
    return updates, state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted token NLL sum and weight sum (float32)."""
  logits = logits_BxLxV.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL)
  weights = weights_BxL.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)
