"""The frozen base of a fine-tune: detect what `init.path` holds (HF directory, GGUF file,
lost_jax pre-training workdir), load it, and name its tokenizer. Nothing here changes the run
config: the loaders return the model config and tokenizer path they read."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lost_jax import configs
from lost_jax.configs import PRECISIONS
from lost_jax.data import tokenizer
from lost_jax.errors import UserError
from lost_jax.formats import bases, gguf, hf
from lost_jax.models.llama import Llama
from lost_jax.training import checkpoint


INIT_SOURCES = ("auto", "hf", "gguf", "pretrain", "random")


detect_base = bases.base_kind


_BASE_HELP = ("a Hugging Face directory (config.json + model.safetensors) or a GGUF file of a "
              "LLaMA, Mistral, Qwen2, Qwen3 or Gemma 3 model, or a lost_jax pre-training "
              "workdir (e.g. after `python -m lost_jax.main "
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
    _check_config_json(path)
    raise UserError(f"config.init.path={path!r} is none of the bases fine-tuning reads. Fix: "
                    f"give {_BASE_HELP}.")
  if src not in ("auto", kind):
    raise UserError(f"config.init.source={src!r} but config.init.path={path!r} holds a "
                    f"{kind!r} base. Fix: set --config.init.source={kind} (or auto).")
  return kind


def _check_config_json(path: str) -> None:
  """One error line for a base directory whose config.json exists but does not parse."""
  config = os.path.join(os.path.expanduser(path or ""), "config.json")
  if not os.path.isfile(config):
    return
  try:
    with open(config, encoding="utf-8") as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"config.init.path={path!r}: its config.json cannot be read as JSON "
                    f"({type(e).__name__}: {e}). Fix: restore that file (download or export "
                    "the model again, or copy it from the run that wrote it)") from e


def load_base(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
              ) -> tuple[Llama, ml_collections.ConfigDict]:
  """(the frozen base model named by cfg.init, its model config).

  A Hugging Face base with a mesh is read slice by slice straight into the mesh shardings
  (each process reads only what its devices hold), in bfloat16 under `mixed` precision
  (frozen weights need no float32 master copy). A GGUF base is dequantised on the host.
  `init.source=random` builds cfg.model afresh (tests only).
  """
  kind, path = base_kind(cfg), cfg.init.path
  dtype, param_dtype = PRECISIONS[cfg.train.precision]
  base_dtype = dtype if cfg.train.precision == "mixed" else param_dtype
  # The architecture is the base's; how the model computes (remat, perf) is this run's.
  compute = configs.compute_settings(cfg.model)
  if kind in ("hf", "gguf"):
    load = hf.load_hf_llama if kind == "hf" else gguf.load_gguf_llama
    model = load(path, dtype=dtype, param_dtype=base_dtype, mesh=mesh, compute=compute)
    return model, ml_collections.ConfigDict(model.cfg.to_dict())
  if kind == "pretrain":
    return _load_pretrained(path, dtype, param_dtype, compute)
  model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
  model_cfg.dtype, model_cfg.param_dtype = dtype, param_dtype
  return Llama(model_cfg, rngs=nnx.Rngs(cfg.seed)), model_cfg


def _load_pretrained(path: str, dtype: str, param_dtype: str, compute: dict
                     ) -> tuple[Llama, ml_collections.ConfigDict]:
  """The latest checkpoint's parameters of a lost_jax pre-training workdir, and its model
  (computing as `compute` says: configs.compute_settings)."""
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
  model_cfg = ml_collections.ConfigDict(dict(run["model"], **compute))
  if model_cfg.linear.kind != "dense":
    raise UserError(f"config.init.path={path!r} holds a {model_cfg.linear.kind!r} model; LoRA "
                    "and SparseLoRA need dense base kernels. Fix: pre-train with method "
                    "full_rank, or densify an identity-activation model "
                    "(lost_jax.formats.hf.densify).")
  model_cfg.dtype, model_cfg.param_dtype = dtype, param_dtype
  step, saved = checkpoint.read_params(path)
  if step is None:
    raise UserError(f"config.init.path={path!r} has no checkpoint. Fix: point at a finished "
                    "pre-training workdir.")
  model = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), saved))
  nnx.update(model, params)
  return model, model_cfg


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
  """data.tokenizer if set; else the base's own: a HF directory's tokenizer.json or
  tokenizer.model, a GGUF file's metadata, a pre-training workdir's setting. A real base is
  never paired with an invented tokenizer ('' only for init.source=random)."""
  if cfg.data.tokenizer:
    return cfg.data.tokenizer
  kind = base_kind(cfg)
  if kind == "hf":
    found = [f for f in (tokenizer.TOKENIZER_JSON, tokenizer.SENTENCEPIECE_MODEL)
             if os.path.exists(os.path.join(cfg.init.path, f))]
    if not found:
      raise UserError(f"config.init.path={cfg.init.path!r} has neither "
                      f"{tokenizer.TOKENIZER_JSON} nor {tokenizer.SENTENCEPIECE_MODEL}. Fix: "
                      "set config.data.tokenizer to the base model's tokenizer file.")
    return os.path.join(cfg.init.path, found[0])
  if kind == "gguf":
    return cfg.init.path
  if kind == "pretrain":
    with open(os.path.join(cfg.init.path, "config.json")) as f:
      return json.load(f)["data"]["tokenizer"]
  return ""
