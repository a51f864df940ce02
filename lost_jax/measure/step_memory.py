"""Memory of one training step, compiled ahead of time for one device (XLA memory_analysis).

The real train step (`training.steps.make_train_step` of a recipe's setup) is lowered on abstract inputs
(`jax.ShapeDtypeStruct`s carrying the step's shardings) and compiled: no parameter is ever
allocated, so a 7B step compiles on a small machine. `measure` returns XLA's buffer bytes
beside what the arguments hold, counted exactly from the abstract inputs.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lost_jax import configs
from lost_jax.training import accounting
from lost_jax.measure import compiled as compiled_lib
from lost_jax.data.batch import KEYS as BATCH_KEYS
from lost_jax.parallel import sharding
from lost_jax.recipes import finetune, pretrain
from lost_jax.training import steps
from lost_jax.training.state import Setup

# Per-device micro-batch (sequences of 256 tokens) per size. The global batch stays the
# paper's 512 sequences, reached by gradient accumulation over 512 / micro-batch passes.
DEFAULT_MICROBATCH = {"quickstart": 4, "llama_60m": 32, "llama_130m": 32, "llama_350m": 32,
                      "llama_1b": 8, "llama_7b": 4}


def measurement_config(size: str, method: str, *, precision: str = "mixed",
                       microbatch: int | None = None, remat: bool = False,
                       overrides: dict[str, Any] | None = None,
                       eight_bit: bool = False) -> ml_collections.ConfigDict:
  """The `<size>,<method>` preset set up for one measurement: precision, micro-batch, remat,
  and (eight_bit) the 8-bit variant of the method's optimizer (adamw8bit / galore8bit)."""
  cfg = configs.pretrain_config(size, method)
  if overrides:
    cfg.update_from_flattened_dict(overrides)
  if eight_bit and not cfg.train.optimizer.endswith("8bit"):
    cfg.train.optimizer += "8bit"
  cfg.model.remat = remat
  cfg.train.precision = precision
  micro = microbatch or DEFAULT_MICROBATCH.get(size, cfg.train.batch_size)
  if micro < 1 or cfg.train.batch_size % micro:
    raise ValueError(f"micro-batch {micro} does not divide the global batch "
                     f"{cfg.train.batch_size}. Fix: pick a divisor, e.g. 8, 16 or 32.")
  cfg.train.microbatches = cfg.train.batch_size // micro
  configs.apply_precision(cfg)
  configs.validate_pretrain(cfg)
  return cfg


def abstract_inputs(setup: Setup, cfg: ml_collections.ConfigDict, abstract_rest=None):
  """(state, rest, batch) as ShapeDtypeStructs carrying the step's input shardings."""
  def with_shardings(tree, shardings):
    # shardings may be a prefix of tree: one sharding for all leaves of an NF4 kernel.
    return jax.tree.map(lambda s, sub: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub), shardings, tree)
  state = with_shardings(setup.abstract_state, setup.state_shardings)
  rest = with_shardings(setup.abstract_rest if abstract_rest is None else abstract_rest,
                        setup.rest_shardings)
  shape_BxL = (cfg.train.batch_size, cfg.data.seq_len)
  batch_sharding = sharding.batch_sharding(setup.mesh)
  batch = {k: jax.ShapeDtypeStruct(shape_BxL, jnp.float32 if k == "weights" else jnp.int32,
                                   sharding=batch_sharding) for k in BATCH_KEYS}
  return state, rest, batch


def compile_step(setup: Setup, cfg: ml_collections.ConfigDict, inputs: tuple, *static):
  """(lowered, compiled) train step of cfg on abstract (state, rest, batch) [+ static args]."""
  step = steps.make_train_step(setup, cfg.train.microbatches)
  lowered = step.lower(*inputs, *static)
  return lowered, lowered.compile()


def compiled_memory(setup: Setup, cfg: ml_collections.ConfigDict, inputs: tuple,
                    t0: float, *static) -> dict:
  """Compile the train step on abstract (state, rest, batch) [+ static args]: XLA's bytes."""
  state, rest, batch = inputs
  lowered, compiled = compile_step(setup, cfg, inputs, *static)
  out = compiled_lib.memory_bytes(compiled)
  out.update(
      # What the arguments hold, from the abstract inputs themselves (exact).
      params_bytes=compiled_lib.tree_bytes(state["params"]),
      opt_state_bytes=compiled_lib.tree_bytes(state["opt_state"]),
      static_bytes=compiled_lib.tree_bytes(rest),
      batch_bytes=compiled_lib.tree_bytes(batch),
      compile_s=time.time() - t0,
      # Matmul result dtypes before and after XLA's passes: a backend may widen bf16 dots.
      dots_before=compiled_lib.dot_dtypes(lowered.as_text(dialect="hlo")),
      dots_after=compiled_lib.dot_dtypes(compiled.as_text()),
  )
  return out


def measure(cfg: ml_collections.ConfigDict, devices: list) -> dict:
  """Compile cfg's train step for `devices` and return XLA's memory numbers (bytes)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  t0 = time.time()
  setup = pretrain.make_setup(cfg, mesh)
  return compiled_memory(setup, cfg, abstract_inputs(setup, cfg), t0)


def finetune_memory_config(preset: str, quantize: str, seqs_per_pass: int = 1
                           ) -> ml_collections.ConfigDict:
  """A SparseLoRA fine-tune preset on a random base (shapes only), bf16 throughout
  (train.precision pure_bf16: base, adapters and moments), one pass of `seqs_per_pass`."""
  cfg = configs.finetune_config(preset)
  cfg.init.source, cfg.init.quantize = "random", quantize
  cfg.train.precision = "pure_bf16"
  cfg.train.batch_size, cfg.train.microbatches = seqs_per_pass, 1
  return cfg


def measure_finetune(cfg: ml_collections.ConfigDict, devices: list) -> dict:
  """Compile cfg's SparseLoRA train step (dense suffix = the answer part) from abstract state."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  t0 = time.time()
  setup, cfg = finetune.abstract_setup(cfg, mesh, devices[0].platform)
  inputs = abstract_inputs(setup, cfg)
  dense_len = cfg.data.seq_len - cfg.data.max_prompt_len
  out = compiled_memory(setup, cfg, inputs, t0, dense_len)
  param_dtype = configs.PRECISIONS[cfg.train.precision][1]   # the frozen base's dtype
  out["base_estimate"] = accounting.base_weight_bytes(cfg.model, cfg.init.quantize,
                                                      jnp.dtype(param_dtype).itemsize)
  out.update(preset=cfg.name, quantize=cfg.init.quantize, dense_len=dense_len,
             seq_len=cfg.data.seq_len, seqs=cfg.train.batch_size,
             lora_rank=cfg.lora.rank, targets=cfg.lora.targets)
  return out
