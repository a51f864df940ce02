"""The jitted train and eval steps around a recipe's loss.

`static` is the recipe's host-side static argument of a batch (None for pre-training): one
step is compiled per distinct value. The trainer passes it through without knowing what it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lost_jax.parallel import sharding
from lost_jax.training.state import Setup


def loss_of(setup: Setup, params, rest, batch, static=None):
  """The recipe's (nll sum, weight sum) of `batch` under `params` (float32 scalars)."""
  return setup.loss(nnx.merge(setup.graphdef, params, rest), batch, static)


def make_train_step(setup: Setup, microbatches: int):
  """(state, rest, batch[, static]) -> (state, metrics), jitted with donated state."""
  tx, schedule = setup.tx, setup.schedule

  def grads_of(params, rest, batch, static):
    if microbatches == 1:
      (nll, weight), grads = jax.value_and_grad(
          lambda p: loss_of(setup, p, rest, batch, static), has_aux=True)(params)
      return grads, nll, weight
    # Gradient accumulation: equal token weighting across micro-batches. Micro-batch j takes
    # rows j, j + mb, j + 2 mb, ...: [B] -> [B/mb, mb] keeps the batch sharding on the row
    # axis, so every device scans over its own rows and no device gathers the batch.
    split = jax.tree.map(lambda x: sharding.constrain_batch(
        x.reshape(-1, microbatches, *x.shape[1:])), batch)
    split = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), split)

    def body(carry, mb):
      mb = jax.tree.map(sharding.constrain_batch, mb)
      g_acc, nll_acc, w_acc = carry
      (nll, weight), g = jax.value_and_grad(
          lambda p: loss_of(setup, p, rest, mb, static), has_aux=True)(params)
      return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, w_acc + weight), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, nll, weight), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), split)
    return grads, nll, weight

  def step_fn(state, rest, batch, static=None):
    params = state["params"]
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):   # activation constraints
      grads, nll, weight = grads_of(params, rest, batch, static)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    loss, grad_norm = nll / denom, optax.tree.norm(grads)
    # A step with a non-finite loss or gradient is not applied: parameters and optimizer state
    # stay exactly as they were (the loop counts such steps and stops after too many). A cond,
    # not a select of new and old: the update can then overwrite the donated state in place
    # (a select keeps the old state alive beside the new one).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(params, opt_state, grads, grad_norm):
      # The clip reuses grad_norm (optim.clip_by_global_norm): no second pass over the grads.
      updates, opt_state = tx.update(grads, opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state

    new_params, opt_state = jax.lax.cond(finite, apply, lambda p, o, *_: (p, o), params,
                                         state["opt_state"], grads, grad_norm)
    new_state = {"params": new_params, "opt_state": opt_state,
                 "step": state["step"] + 1,
                 "rng": jax.random.fold_in(state["rng"], state["step"])}
    out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
           "tokens": weight, "skipped": ~finite}
    return new_state, out

  return jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.rest_shardings,
                                        sharding.batch_sharding(setup.mesh)),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,), static_argnums=(3,))


def make_eval_step(setup: Setup):
  """(params, rest, batch[, static]) -> (nll sum, weight sum)."""
  def eval_fn(params, rest, batch, static=None):
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
      return loss_of(setup, params, rest, batch, static)
  return jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], setup.rest_shardings,
                                        sharding.batch_sharding(setup.mesh)),
                 static_argnums=(3,))
