"""Learning-rate schedule and optimizers (AdamW, GaLore) over an nnx.State of parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lost_jax.errors import UserError


def lr_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to train.lr over warmup_frac of steps, cosine decay to min_lr_ratio * lr."""
  warmup = max(1, int(train.warmup_frac * train.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=warmup,
      decay_steps=max(train.steps, warmup + 1), end_value=train.lr * train.min_lr_ratio)


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
                   moment_dtype=None) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW (or GaLore on block kernels, AdamW elsewhere).

  With train.shared_lr > 0 the embedding, LM head and norm scales train at peak shared_lr
  instead of lr (same schedule shape), so methods can share them while their block lr varies.
  """
  schedule = lr_schedule(train)
  mask = decay_mask(params, train.decay_norms_and_embeddings)
  adamw = optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                      weight_decay=train.weight_decay, mask=mask, mu_dtype=moment_dtype)
  if train.optimizer == "adamw":
    opt = adamw
  elif train.optimizer == "galore":
    galore = optax.contrib.galore(
        schedule, rank=train.galore_rank, update_proj_gap=train.galore_update_freq,
        scale=train.galore_scale, weight_decay=train.weight_decay,
        base_optimizer=optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps,
                                           mu_dtype=moment_dtype))
    opt = optax.partition({"galore": galore, "adam": adamw}, galore_labels(params))
  else:
    raise UserError(f"config.train.optimizer={train.optimizer!r} is unknown. "
                    "Fix: use 'adamw' or 'galore'.")
  if train.get("shared_lr", 0.0) > 0:
    opt = optax.chain(opt, lr_scale_by_leaf(shared_lr_scales(train, params)))
  if train.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(train.clip_norm), opt)
  return opt


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted token NLL sum and weight sum (float32)."""
  logits = logits_BxLxV.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxL)
  weights = weights_BxL.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)
