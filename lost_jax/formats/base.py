"""Frozen base models for fine-tuning: detect what a path holds (HF directory, GGUF file,
lost_jax pre-training workdir) and load it."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from lost_jax.errors import UserError
from lost_jax.formats import gguf, hf
from lost_jax.models.llama import Llama
from lost_jax.configs import PRECISIONS


INIT_SOURCES = ("auto", "hf", "gguf", "pretrain", "random")


def detect_base(path: str) -> str | None:
  """What init.path holds: 'gguf' (a GGUF file), 'hf' (a directory with a HF config.json and
  safetensors), 'pretrain' (a lost_jax workdir: its config.json has model and train groups),
  or None."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return "gguf" if f.read(4) == b"GGUF" else None
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    return None
  try:
    with open(config) as f:
      run = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  if isinstance(run, dict) and "model" in run and "train" in run:
    return "pretrain"
  if isinstance(run, dict) and ("model_type" in run or "architectures" in run) and any(
      os.path.exists(os.path.join(path, f)) for f in (hf.WEIGHTS_FILE, hf.INDEX_FILE)):
    return "hf"
  return None


_BASE_HELP = ("a Hugging Face LLaMA directory (config.json + model.safetensors), a LLaMA GGUF "
              "file, or a lost_jax pre-training workdir (e.g. after `python -m lost_jax.main "
              "pretrain --config=configs/pretrain.py:quickstart,full_rank --workdir=/tmp/qs_fr`:"
              " --config.init.path=/tmp/qs_fr)")


def base_kind(cfg: ml_collections.ConfigDict) -> str:
  """init.source resolved against what init.path holds; one ValueError naming the fix."""
  src, path = cfg.init.source, cfg.init.path
  if src not in INIT_SOURCES:
    raise UserError(f"config.init.source={src!r} is unknown. Fix: one of {INIT_SOURCES}.")
  if src == "random":
    return src
  kind = detect_base(path) if path else None
  if kind is None:
    raise UserError(f"config.init.path={path!r} is none of the bases fine-tuning reads. Fix: "
                    f"give {_BASE_HELP}.")
  if src not in ("auto", kind):
    raise UserError(f"config.init.source={src!r} but config.init.path={path!r} holds a "
                    f"{kind!r} base. Fix: set --config.init.source={kind} (or auto).")
  return kind


def load_base(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Llama:
  """The frozen base model named by cfg.init; cfg.model is updated to its shape.

  A Hugging Face base with a mesh is read slice by slice straight into the mesh shardings
  (each process reads only what its devices hold), in bfloat16 under `mixed` precision
  (frozen weights need no float32 master copy). A GGUF base is dequantised on the host.
  """
  kind, path = base_kind(cfg), cfg.init.path
  dtype, param_dtype = PRECISIONS[cfg.train.precision]
  base_dtype = dtype if cfg.train.precision == "mixed" else param_dtype
  if kind in ("hf", "gguf"):
    if kind == "hf":
      model = hf.load_hf_llama(path, dtype=dtype, param_dtype=base_dtype, mesh=mesh)
    else:
      model = gguf.load_gguf_llama(path, dtype=dtype, param_dtype=base_dtype, mesh=mesh)
    cfg.model = ml_collections.ConfigDict(model.cfg.to_dict())
    return model
  if kind == "pretrain":
    return _load_pretrained(cfg, path, dtype, param_dtype)
  cfg.model.dtype, cfg.model.param_dtype = dtype, param_dtype
  return Llama(cfg.model, rngs=nnx.Rngs(cfg.seed))


def _load_pretrained(cfg, path: str, dtype: str, param_dtype: str) -> Llama:
  """Parameters of the latest checkpoint of a lost_jax pre-training workdir."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      run = json.load(f)
    run["model"]["linear"]["kind"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    hint = (" Its config.json looks like a Hugging Face one: set --config.init.source=hf."
            if os.path.exists(os.path.join(path, "config.json")) else "")
    raise UserError(f"config.init.path={path!r} is not a lost_jax pre-training workdir (its "
                    f"config.json is missing or has no model group: {type(e).__name__}).{hint} "
                    "Fix: point init.path at a pre-training --workdir, or set init.source to "
                    "what is there.") from e
  model_cfg = ml_collections.ConfigDict(run["model"])
  if model_cfg.linear.kind != "dense":
    raise UserError(f"config.init.path={path!r} holds a {model_cfg.linear.kind!r} model; LoRA "
                    "and SparseLoRA need dense base kernels. Fix: pre-train with method "
                    "full_rank, or densify an identity-activation model (lost_jax.hf.densify).")
  model_cfg.dtype, model_cfg.param_dtype = dtype, param_dtype
  cfg.model = model_cfg
  model = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
  mgr = ocp.CheckpointManager(os.path.join(path, "checkpoints"),
                              item_names=("state", "rest", "data", "meta"))
  step = mgr.latest_step()
  if step is None:
    raise UserError(f"config.init.path={path!r} has no checkpoint. Fix: point at a finished "
                    "pre-training workdir.")
  saved = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.tree.map(lambda x: jnp.asarray(x, param_dtype),
                                           saved["state"]["params"]))
  nnx.update(model, params)
  return model
