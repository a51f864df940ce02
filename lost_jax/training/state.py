"""The train state on a mesh: abstract model -> shardings -> a jitted init, and batch placement.

A `Recipe` (trainer.py) hands over its model either as a builder (pre-training: fresh
parameters made by the jitted init, so no full-size host copy ever exists) or as a built
module (fine-tuning: a loaded frozen base with adapters, placed on the mesh). Either way the
trainable variables (`recipe.trainable`, an nnx filter) become `state["params"]` and every
other variable is the frozen `rest`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lost_jax.data.batch import KEYS as BATCH_KEYS
from lost_jax.parallel import sharding
from lost_jax.training import optim


@dataclasses.dataclass
class Setup:
  """Everything static about a run: model graph, loss, optimizer, mesh and shardings.

  `init(key)` -> (state, rest): the sharded initial train state and frozen variables.
  `place_rest()` -> rest: the frozen variables alone, for a built module whose checkpoints
  leave them out (None for a builder: its frozen variables come from `init` or a checkpoint).
  """
  graphdef: Any
  loss: Callable
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  state_shardings: Any
  rest_shardings: Any
  abstract_state: Any
  abstract_rest: Any
  init: Callable
  place_rest: Callable | None = None


def make_setup(model, loss: Callable, train_cfg: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, *, trainable: Any = nnx.Param,
               moment_dtype: Any = jnp.float32) -> Setup:
  """Setup for training the `trainable` variables of `model` with `loss`.

  `model`: a builder `rngs -> nnx.Module` (initialised inside a jit with the shardings as
  out_shardings) or a module (possibly abstract, from nnx.eval_shape) whose values are placed.
  `loss(module, batch, static) -> (nll sum, weight sum)`.
  """
  build = model if callable(model) and not isinstance(model, nnx.Module) else None
  module = nnx.eval_shape(lambda: build(nnx.Rngs(0))) if build else model
  graphdef, abs_params, abs_rest = nnx.split(module, trainable, ...)
  notes: list[str] = []
  param_shardings = nnx.as_pure(sharding.state_shardings(abs_params, mesh, notes))
  params = nnx.as_pure(abs_params)
  tx = optim.make_optimizer(train_cfg, params, moment_dtype=moment_dtype,
                            param_shardings=param_shardings)
  schedule = optim.lr_schedule(train_cfg)
  rest_shardings = nnx.as_pure(sharding.state_shardings(abs_rest, mesh, notes))

  def new_state(params, rng):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": rng}

  def init_built(key):
    model = build(nnx.Rngs(params=key))
    _, params, rest = nnx.split(model, trainable, ...)
    return new_state(nnx.as_pure(params), jax.random.fold_in(key, 1)), nnx.as_pure(rest)

  if build:
    abstract_state, abstract_rest = jax.eval_shape(init_built, jax.random.key(0))
  else:
    abstract_state = jax.eval_shape(new_state, params, jax.random.key(0))
    abstract_rest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                 nnx.as_pure(abs_rest))
  repl = sharding.replicated(mesh)
  state_shardings = {"params": param_shardings,
                     "opt_state": sharding.opt_state_shardings(
                         abstract_state["opt_state"], param_shardings,
                         abstract_state["params"], mesh, notes),
                     "step": repl, "rng": repl}
  sharding.warn_unsharded(notes)
  if build:
    init = jax.jit(init_built, out_shardings=(state_shardings, rest_shardings))
    place_rest = None
  else:
    jit_state = jax.jit(new_state, out_shardings=state_shardings)

    def place_rest():
      return jax.device_put(nnx.as_pure(abs_rest), rest_shardings)

    def init(key):
      return jit_state(jax.device_put(params, param_shardings), key), place_rest()
  return Setup(graphdef, loss, tx, schedule, mesh, state_shardings, rest_shardings,
               abstract_state, abstract_rest, init, place_rest)


def to_global(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Place this process's part of a batch on the mesh as global arrays."""
  shard = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(shard, np.asarray(batch[k]))
          for k in BATCH_KEYS}
