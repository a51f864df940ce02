"""A run's model at one of its checkpoints, rebuilt from the workdir alone (its config.json,
checkpoints and, for a fine-tune, the base its config names), in float32 on the host."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lost_jax.adapters.lora import LoRAParam, apply_lora, quantize_base
from lost_jax.errors import UserError
from lost_jax.models.llama import Llama
from lost_jax.recipes.base import load_base
from lost_jax.training import checkpoint


_PLATFORM_CHOICES = ("matmul_backward", "attention", "attention_impl", "layer_loop")


@dataclasses.dataclass
class SavedRun:
  """kind: 'pretrain' or 'finetune'; cfg: the run's config.json; model: float32 Llama (a
  fine-tune's with its LoRALinear adapters in place)."""
  kind: str
  cfg: ml_collections.ConfigDict
  step: int
  model: Llama


def run_config(workdir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the config a run recorded, 'pretrain' or 'finetune'); one error line for a directory
  that is not a lost_jax run."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      cfg = json.load(f)
    cfg["model"]["linear"]["kind"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"--workdir={workdir} is not a lost_jax run ({path} is missing or has no "
                    f"model group: {type(e).__name__}). Fix: pass the --workdir of a "
                    "pretrain or finetune run") from e
  for key in _PLATFORM_CHOICES:   # chosen for the platform it trained on: re-chosen here
    if key in cfg["model"].get("perf", {}):
      cfg["model"]["perf"][key] = "auto"
  return ml_collections.ConfigDict(cfg), "finetune" if "lora" in cfg else "pretrain"


def abstract_model(cfg: ml_collections.ConfigDict) -> Llama:
  """The run's float32 model with no values (nnx.eval_shape): shapes and layer kinds only."""
  model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
  model_cfg.dtype = model_cfg.param_dtype = "float32"
  return nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))


def _fill(module, variables, saved) -> None:
  """Set the variables `variables` (an nnx filter) of module from a checkpoint's pure tree."""
  state = nnx.state(module, variables)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)
                                               if jnp.issubdtype(x.dtype, jnp.floating)
                                               else jnp.asarray(x), saved))
  nnx.update(module, state)


def load_run(workdir: str, step: int | None = None) -> SavedRun:
  """The run's model at checkpoint `step` (the newest when None), in float32.

  A fine-tune rebuilds its frozen base from the source its config names (an NF4 base is
  quantised as in training: the adapters were trained on that base) and restores the LoRA
  adapters; pre-training restores every parameter and the static rest (LOST indices).
  """
  cfg, kind = run_config(workdir)
  found, params, rest = checkpoint.read_saved(workdir, step)
  if found is None:
    raise UserError(f"workdir {workdir} has no checkpoint yet. Fix: let the run save one "
                    "(train.ckpt_every, or its end), then run this command again")
  if kind == "pretrain":
    model = abstract_model(cfg)
    _fill(model, nnx.Param, params)
    if rest is not None:
      _fill(model, nnx.Not(nnx.Param), rest)
  else:
    cfg.train.precision = "float32"   # the base's own weights, unrounded
    model, _ = load_base(cfg)
    quantize_base(model, cfg.init.get("quantize", "none"))
    targets = tuple(t.strip() for t in cfg.lora.targets.split(",") if t.strip())
    apply_lora(model, targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0,
               param_dtype="float32", rngs=nnx.Rngs(0))
    # The checkpoint holds the adapters of the SparseLoRA wrapper, whose `model` this is.
    _fill(model, LoRAParam, params["model"])
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if isinstance(var.get_value(), jax.ShapeDtypeStruct):
      raise ValueError(f"workdir {workdir} step {found}: {'.'.join(map(str, path))} was not "
                       "in the checkpoint")
  return SavedRun(kind, cfg, found, model)
