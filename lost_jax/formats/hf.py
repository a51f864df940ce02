"""Hugging Face checkpoints <-> lost_jax `Llama` (safetensors; torch is not needed).

Families (HF model_type): llama, mistral, qwen2, qwen3, gemma3_text (and a `gemma3` config's
text_config); each is a set of `configs.Arch` settings of the one decoder, read from and
written to config.json here. HF `nn.Linear` weights are [out, in]; lost_jax kernels are
[in, out], so projections are transposed both ways. HF's q/k projections use the same
rotate-half RoPE as `model.apply_rope`, so no head permutation is needed (tests/test_hf.py and
tests/test_families.py check logits against transformers). Tied embeddings are read by copying
the embedding into the untied `lm_head`; an export is tied again when the LM head still equals
the embedding. `load_hf_tensors` builds a model from a config dict and named tensors in memory
(the GGUF readers' way in).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lost_jax import configs as configs_lib
from lost_jax import progress
from lost_jax.layers import linear as layers_lib
from lost_jax.parallel import sharding as sharding_lib
from lost_jax.errors import UserError
from lost_jax.models.llama import Llama, rope_scaling_of
from lost_jax.layers import lost as lost_layers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


# HF names of a block's norms: LLaMA's post_attention_layernorm is the pre-FFN norm; Gemma 3
# (post_norms) has four, its post_attention_layernorm normalising the attention output.
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_POST_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm",
               "mlp_post_norm": "post_feedforward_layernorm"}


def tensor_map(n_layers: int, arch: configs_lib.Arch | None = None
               ) -> dict[str, tuple[tuple[str | int, ...], bool]]:
  """HF tensor name -> (lost_jax attribute path, transposed?) for a dense Llama of `arch`
  (default: LLaMA's settings)."""
  names = {
      "model.embed_tokens.weight": (("embed", "embedding"), False),
      "model.norm.weight": (("final_norm", "scale"), False),
      "lm_head.weight": (("lm_head", "kernel"), True),
  }
  post, bias = arch is not None and arch.post_norms, arch is not None and arch.qkv_bias
  qk_norm = arch is not None and arch.qk_norm
  for i in range(n_layers):
    p = f"model.layers.{i}."
    for ours, theirs in (_POST_NORMS if post else _NORMS).items():
      names[f"{p}{theirs}.weight"] = (("layers", i, ours, "scale"), False)
    for ours, theirs in _ATTN.items():
      names[f"{p}self_attn.{theirs}.weight"] = (("layers", i, "attn", ours, "kernel"), True)
      if bias and ours != "o":
        names[f"{p}self_attn.{theirs}.bias"] = (("layers", i, "attn", f"{ours}_bias"), False)
    for ours in ("q_norm", "k_norm") if qk_norm else ():
      names[f"{p}self_attn.{ours}.weight"] = (("layers", i, "attn", ours, "scale"), False)
    for ours, theirs in _MLP.items():
      names[f"{p}mlp.{theirs}.weight"] = (("layers", i, "mlp", ours, "kernel"), True)
  return names


def linear_paths(n_layers: int) -> list[tuple[str | int, ...]]:
  """Attribute paths of every q/k/v/o/gate/up/down projection."""
  return ([("layers", i, "attn", name) for i in range(n_layers) for name in _ATTN]
          + [("layers", i, "mlp", name) for i in range(n_layers) for name in _MLP])


def get_path(module: Any, path: tuple[str | int, ...]) -> Any:
  """The submodule or variable of module at path (attribute names and list indices)."""
  for p in path:
    module = module[p] if isinstance(p, int) else getattr(module, p)
  return module


def _path_str(path) -> str:
  return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# ---------------------------------------------------------------------------- config.json


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_LAYER_TYPES = {"full_attention": "G", "sliding_attention": "L"}


def _refuse(where: str, field: str, value: Any, why: str, fix: str):
  raise UserError(f"{where}: {field}={value!r} {why}; lost_jax's decoder cannot represent it. "
                  f"Fix: {fix}")


def _text_config(hf: dict, where: str) -> dict:
  """The text model's config: a `gemma3` (multimodal) config's text_config, else hf itself."""
  if hf.get("model_type") != "gemma3":
    return hf
  text = hf.get("text_config")
  if not isinstance(text, dict):
    _refuse(where, "text_config", text, "is not a Gemma 3 text config",
            "use a config.json with a text_config (or a gemma3_text checkpoint)")
  return {"model_type": "gemma3_text", **text}


def _rope_scaling(where: str, field: str, value: dict | None) -> ml_collections.ConfigDict:
  """configs.rope_scaling_config of one HF rope dict (rope_scaling or rope_parameters)."""
  kind = (value or {}).get("rope_type", (value or {}).get("type", "default"))
  if kind == "default":
    return configs_lib.rope_scaling_config()
  if kind not in configs_lib.ROPE_TYPES:
    _refuse(where, field, value, "rescales RoPE in a way lost_jax does not implement",
            f"use a checkpoint whose rope_type is one of {configs_lib.ROPE_TYPES}")
  try:
    return configs_lib.rope_scaling_config(
        kind, value["factor"], **({k: value[k] for k in (
            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
            if kind == "llama3" else {}))
  except KeyError as e:
    _refuse(where, field, value, f"lacks {e}", "complete the rope settings in config.json")


def _layer_pattern(hf: dict, family: str, n_layers: int, where: str) -> tuple[str, int]:
  """(attention_pattern, sliding_window) of the HF config: 'G' and 0 without local layers."""
  window = hf.get("sliding_window") or 0
  if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = 0             # transformers ignores sliding_window unless use_sliding_window
  if family == "llama" or not window:
    return "G", 0
  types = hf.get("layer_types")
  if types is None:        # configs written before transformers listed layer_types
    if family == "mistral":
      types = ["sliding_attention"] * n_layers
    elif family == "gemma3_text":
      every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
      types = ["sliding_attention" if (i + 1) % every else "full_attention"
               for i in range(n_layers)]
    else:
      first = hf.get("max_window_layers", n_layers)
      types = ["sliding_attention" if i >= first else "full_attention"
               for i in range(n_layers)]
  if len(types) != n_layers or set(types) - set(_LAYER_TYPES):
    _refuse(where, "layer_types", types, f"is not {n_layers} of {tuple(_LAYER_TYPES)}",
            "use the config.json saved with the checkpoint")
  if family == "mistral" and set(types) != {"sliding_attention"}:
    _refuse(where, "layer_types", types, "mixes layer types in a Mistral",
            "use a Gemma 3 or Qwen config for mixed local/global layers")
  letters = "".join(_LAYER_TYPES[t] for t in types)
  if "L" not in letters:
    return "G", 0
  period = next(p for p in range(1, n_layers + 1)
                if all(letters[i] == letters[i % p] for i in range(n_layers)))
  return letters[:period], int(window)


def _config_from_hf(hf: dict, where: str) -> tuple[ml_collections.ConfigDict, bool]:
  """(lost_jax model config, tie_word_embeddings) from a parsed HF config.json of a family in
  ARCHITECTURES; one UserError for anything the decoder cannot represent."""
  hf = _text_config(hf, where)
  family = hf.get("model_type", "llama")
  if family not in ARCHITECTURES:
    _refuse(where, "model_type", family, "is not a supported family",
            f"convert a checkpoint of one of {tuple(ARCHITECTURES)}")
  gemma = family == "gemma3_text"
  act_field = "hidden_activation" if gemma else "hidden_act"
  act = hf.get(act_field) or ("gelu_pytorch_tanh" if gemma else "silu")
  if act not in _HF_ACTIVATIONS:
    _refuse(where, act_field, act, "is not SiLU (SwiGLU) or tanh GELU (GeGLU)",
            "use a silu or gelu_pytorch_tanh checkpoint")
  for field in ("attention_bias", "mlp_bias", "final_logit_softcapping",
                "attn_logit_softcapping", "use_bidirectional_attention"):
    if hf.get(field):
      _refuse(where, field, hf[field], "is not implemented (biases on o or the FFN, logit "
              "softcapping, bidirectional attention)", f"use a checkpoint without {field}")
  # transformers < 5 writes rope_theta + rope_scaling; >= 5 writes rope_parameters, per layer
  # type for Gemma 3 ({"full_attention": ..., "sliding_attention": ...}).
  rope = hf.get("rope_parameters") or {}
  local_rope = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)} if gemma else {}
  if "full_attention" in rope or "sliding_attention" in rope:
    local_rope = rope.get("sliding_attention") or local_rope
    rope = rope.get("full_attention") or {}
  scaling = configs_lib.rope_scaling_config()
  for field, value in (("rope_scaling", hf.get("rope_scaling")), ("rope_parameters", rope)):
    if (value or {}).get("rope_type", (value or {}).get("type", "default")) != "default":
      scaling = _rope_scaling(where, field, value)
  if local_rope.get("rope_type", "default") != "default":
    _refuse(where, "rope_parameters.sliding_attention", local_rope, "rescales the local "
            "layers' RoPE", "use a checkpoint whose local layers use the default RoPE")
  missing = [field for field in _REQUIRED if field not in hf]
  if missing:
    raise UserError(f"{where}: {', '.join(missing)} missing. Fix: use the config.json saved "
                    f"with the checkpoint (a {ARCHITECTURES[family]} config names all of "
                    f"{', '.join(_REQUIRED)})")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  # Qwen3 and Gemma 3 default head_dim to 128 / 256 when config.json leaves it out.
  head_dim = hf.get("head_dim") or {"qwen3": 128, "gemma3_text": 256}.get(family, d // heads)
  n_layers = hf["num_hidden_layers"]
  pattern, window = _layer_pattern(hf, family, n_layers, where)

  # Start from a preset so any field this file does not set keeps the library default.
  cfg = configs_lib.model_config("quickstart")
  cfg.vocab_size = hf["vocab_size"]
  cfg.d_model = d
  cfg.ffn_dim = hf["intermediate_size"]
  cfg.n_layers = n_layers
  cfg.n_heads = heads
  cfg.n_kv_heads = hf.get("num_key_value_heads") or heads
  cfg.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta",
                                                       1e6 if gemma else 10_000.0)))
  cfg.rope_scaling = scaling
  cfg.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
  cfg.init_std = float(hf.get("initializer_range", 0.02))
  cfg.linear = configs_lib.linear_config("dense")
  cfg.update(dict(
      family=family,
      head_dim=0 if head_dim * heads == d else int(head_dim),   # 0: d_model // n_heads
      qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3_text"),
      mlp_activation=_HF_ACTIVATIONS[act], norm_scale="1+w" if gemma else "w",
      embed_scale=gemma, post_norms=gemma, sliding_window=window, attention_pattern=pattern,
      rope_local_theta=float(local_rope["rope_theta"]) if gemma else 0.0,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else 0.0))
  configs_lib.validate_model(cfg)
  return cfg, bool(hf.get("tie_word_embeddings", gemma))


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise UserError(f"{path} is missing. Fix: give a complete Hugging Face model directory "
                    "(config.json + model.safetensors)") from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} cannot be read as JSON ({type(e).__name__}: {e}). Fix: restore "
                    "the file (download or export the model again)") from e


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


@contextlib.contextmanager
def _open_safetensors(file: str, framework: str):
  """safe_open, with a damaged file (truncated, not safetensors) as one UserError."""
  try:
    handle = safe_open(file, framework=framework)
  except (OSError, SafetensorError) as e:
    raise UserError(f"{file} is not a readable safetensors file ({e}). Fix: restore the "
                    "file (download or export the model again)") from e
  with handle as f:
    yield f


def load_hf_config(path: str) -> ml_collections.ConfigDict:
  """lost_jax model config (linear.kind='dense') from a HF LLaMA directory's config.json."""
  cfg, _ = _config_from_hf(_read_json(os.path.join(path, CONFIG_FILE)),
                           os.path.join(path, CONFIG_FILE))
  return cfg


def hf_config(cfg: ml_collections.ConfigDict, dtype: str = "bfloat16",
              overrides: dict | None = None) -> dict:
  """config.json contents of the HF model (model.family's architecture) equal to a dense
  lost_jax model config; a setting the family's config cannot hold is refused."""
  arch = configs_lib.Arch.of(cfg)
  family = arch.family
  n = cfg.n_layers
  local = arch.local_layers(n)
  types = ["sliding_attention" if x else "full_attention" for x in local]
  hf = {
      "architectures": [ARCHITECTURES[family]],
      "model_type": family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.ffn_dim,
      "num_hidden_layers": n,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": arch.head_dim,
      "rms_norm_eps": cfg.norm_eps,
      # transformers 5 also reads these legacy keys; older versions read nothing else.
      "rope_theta": cfg.rope_theta,
      "rope_scaling": _hf_rope_scaling(cfg),
      "attention_dropout": 0.0,
      "tie_word_embeddings": False,
      "initializer_range": cfg.init_std,
      "max_position_embeddings": 2048,   # lost_jax's RoPE has no limit; override as needed.
      "torch_dtype": dtype,
      "dtype": dtype,
  }
  act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[arch.mlp_activation]
  hf["hidden_activation" if family == "gemma3_text" else "hidden_act"] = act
  if family != "qwen2":      # Qwen2's q/k/v biases are implied by its architecture
    hf["attention_bias"] = False
  if family == "llama":
    hf["mlp_bias"] = False
  if family == "mistral":
    hf["sliding_window"] = arch.sliding_window or None
  if family in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=any(local), sliding_window=arch.sliding_window or None,
              max_window_layers=local.index(1) if any(local) else n, layer_types=types)
  if family == "gemma3_text":
    hf.update(sliding_window=arch.sliding_window or 4096, layer_types=types,
              rope_local_base_freq=arch.rope_local_theta or cfg.rope_theta,
              # transformers types it int (a float is refused)
              query_pre_attn_scalar=_int_if_whole(arch.query_pre_attn_scalar or arch.head_dim),
              final_logit_softcapping=None, attn_logit_softcapping=None)
  hf.update(overrides or {})
  # An override must stay representable, and the family must hold every setting.
  back, _ = _config_from_hf(hf, "hf_config(overrides=...)")
  _check_family(cfg, back)
  return hf


def _int_if_whole(x: float) -> int | float:
  return int(x) if float(x).is_integer() else x


def _effective_arch(cfg: ml_collections.ConfigDict) -> configs_lib.Arch:
  """cfg's architecture with equivalent spellings made equal (pattern as per-layer flags,
  0 defaults replaced by the values they stand for)."""
  arch = configs_lib.Arch.of(cfg)
  local = arch.local_layers(cfg.n_layers)
  return arch._replace(attention_pattern=local,
                       sliding_window=arch.sliding_window if any(local) else 0,
                       rope_local_theta=(arch.rope_local_theta or cfg.rope_theta)
                       if any(local) else 0.0,
                       query_pre_attn_scalar=arch.attn_scale)


def _check_family(cfg: ml_collections.ConfigDict, back: ml_collections.ConfigDict) -> None:
  """Refuse a model whose architecture settings its family's config.json cannot carry."""
  want, got = _effective_arch(cfg), _effective_arch(back)
  for field in configs_lib.ARCH_DEFAULTS:
    if getattr(want, field) != getattr(got, field):
      raise UserError(f"model.{field}={cfg.get(field)!r} has no place in a {want.family} "
                      f"config.json ({ARCHITECTURES[want.family]} would read "
                      f"{back.get(field)!r}). Fix: set model.family to one of "
                      f"{tuple(ARCHITECTURES)} that has it, or export another model.")


def _hf_rope_scaling(cfg: ml_collections.ConfigDict) -> dict | None:
  """HF's rope_scaling dict of a model config (None without rescaling)."""
  rope = rope_scaling_of(cfg)
  if rope.type == "default":
    return None
  out = {"rope_type": rope.type, "factor": rope.factor}
  if rope.type == "llama3":
    out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
               original_max_position_embeddings=rope.original_max_position_embeddings)
  return out


# ---------------------------------------------------------------------------- import


def _tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file holding it (single file or sharded index)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    return {name: os.path.join(path, file)
            for name, file in _read_json(index)["weight_map"].items()}
  single = os.path.join(path, WEIGHTS_FILE)
  if os.path.exists(single):
    with _open_safetensors(single, "flax") as f:
      return {name: single for name in f.keys()}
  raise UserError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}. Fix: save the "
                          "HF model with save_pretrained(..., safe_serialization=True); "
                          "pytorch_model.bin is not read.")


def _check_names(available: set[str], expected: set[str], path: str, cfg):
  missing, unexpected = sorted(expected - available), sorted(available - expected)
  family = configs_lib.Arch.of(cfg).family
  shape = f"a {cfg.n_layers}-layer {family} per {CONFIG_FILE}"
  if missing:
    raise UserError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) "
                    f"but {shape} needs it. Fix: check the checkpoint is complete and matches "
                    f"its {CONFIG_FILE}.")
  if unexpected:
    raise UserError(f"{path}: tensor {unexpected[0]!r} is unexpected ({len(unexpected)} in all) "
                    f"for {shape}. Fix: check the checkpoint is a plain "
                    f"{ARCHITECTURES[family]} that matches its {CONFIG_FILE}.")


def _plan_import(hf: dict, where: str, available: Iterable[str], dtype: str,
                 param_dtype: str, config_where: str | None = None,
                 compute: Mapping[str, Any] | None = None) -> tuple[Llama, dict, bool]:
  """(abstract model, HF name -> (path, transposed?) of the tensors to read, tied) of a HF
  config whose checkpoint holds the tensors `available`; refuses a missing or extra one.
  Errors name `where` (the checkpoint), or `config_where` (its config file) for the config.
  `compute`: model settings the file does not hold (`remat`, `perf`), the run's choice."""
  cfg, tied = _config_from_hf(hf, config_where or where)
  cfg.dtype, cfg.param_dtype = dtype, param_dtype
  for key, value in (compute or {}).items():
    cfg[key] = ml_collections.ConfigDict(value) if isinstance(value, Mapping) else value
  names = tensor_map(cfg.n_layers, configs_lib.Arch.of(cfg))
  if tied:   # HF ignores a stored lm_head.weight when tied; so do we.
    names.pop("lm_head.weight")
  # Older checkpoints store the RoPE frequency buffer; it is recomputed from rope_theta.
  available = {k for k in available
               if not k.endswith("rotary_emb.inv_freq") and not (tied and k == "lm_head.weight")}
  _check_names(available, set(names), where, cfg)
  # Abstract build: no random full-size initialisation; every value comes from the file.
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), names, tied


def _finish_import(model: Llama, tied: bool, mesh: jax.sharding.Mesh | None) -> Llama:
  if tied:
    _set(model.lm_head.kernel, model.embed.embedding[...].T, mesh)
  for p, var in nnx.to_flat_state(nnx.state(model)):
    if isinstance(var.get_value(), jax.ShapeDtypeStruct):
      raise ValueError(f"lost_jax parameter {_path_str(p)} has no HF tensor in tensor_map. Fix: "
                       "extend lost_jax.hf.tensor_map for the new parameter.")
  return model


def load_hf_tensors(hf: dict, names: Iterable[str], get_tensor: Callable[[str], Any], *,
                    dtype: str = "float32", param_dtype: str = "float32",
                    mesh: jax.sharding.Mesh | None = None, where: str = "HF config",
                    compute: Mapping[str, Any] | None = None) -> Llama:
  """A dense Llama from a parsed HF config.json dict and HF-named tensors held in memory.

  names: every tensor name the checkpoint has (a missing or extra one is refused);
  get_tensor(name) -> array in HF layout ([out, in] for linear weights), any float dtype.
  `where` names the source in error messages. compute: the run's `remat` / `perf`
  (configs.compute_settings), which no checkpoint holds; the defaults when None.
  """
  model, targets, tied = _plan_import(hf, where, names, dtype, param_dtype, compute=compute)
  for name, (attr, transpose) in progress.track(list(targets.items()), "loading HF base",
                                                "tensor"):
    x = np.asarray(get_tensor(name))
    var = get_path(model, attr)
    want = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
    if x.shape != want:
      raise UserError(f"{where}: tensor {name!r} is {x.shape} but the config implies {want} "
                      f"(lost_jax {_path_str(attr)} {tuple(var.shape)}). Fix: check the "
                      "tensors match the config.")
    _set(var, x.T if transpose else x, mesh)
  return _finish_import(model, tied, mesh)


def load_hf_llama(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                  mesh: jax.sharding.Mesh | None = None,
                  compute: Mapping[str, Any] | None = None) -> Llama:
  """A dense lost_jax Llama holding a HF checkpoint of any supported family (f32/bf16/f16
  safetensors); `compute` as in load_hf_tensors."""
  where = os.path.join(path, CONFIG_FILE)
  files = _tensor_files(path)
  model, names, tied = _plan_import(_read_json(where), path, files, dtype, param_dtype,
                                    config_where=where, compute=compute)
  files = {k: v for k, v in files.items() if k in names}
  by_file: dict[str, list[str]] = {}
  for name, file in files.items():
    by_file.setdefault(file, []).append(name)
  with progress.bar(len(files), "loading HF base", "tensor") as read:
    for file, file_names in sorted(by_file.items()):
      with _open_safetensors(file, "flax" if mesh is None else "numpy") as f:
        for name in file_names:
          _read_tensor(f, name, names[name], model, mesh, file)
          read.update(1)
  return _finish_import(model, tied, mesh)


def _read_tensor(f, name: str, target: tuple[tuple[str | int, ...], bool], model: Llama,
                 mesh: jax.sharding.Mesh | None, file: str) -> None:
  """Read safetensors tensor `name` of the open file `f` into its variable of `model`."""
  attr, transpose = target
  var = get_path(model, attr)
  want = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
  got = f.get_slice(name)
  if tuple(got.get_shape()) != want or got.get_dtype() not in _DTYPES:
    raise UserError(f"{file}: tensor {name!r} is {got.get_dtype()} {tuple(got.get_shape())}"
                    f" but {CONFIG_FILE} implies a float32/bfloat16/float16 {want} "
                    f"(lost_jax {_path_str(attr)} {tuple(var.shape)}). Fix: check the "
                    f"checkpoint matches its {CONFIG_FILE}.")
  if mesh is not None:
    var.set_value(_sharded_read(got, var, transpose, mesh))
    return
  x = f.get_tensor(name)
  _set(var, x.T if transpose else x, mesh)


def _sharded_read(tensor_slice, var: nnx.Variable, transpose: bool,
                  mesh: jax.sharding.Mesh) -> jax.Array:
  """The variable's value on the mesh, reading only the slices of the safetensors tensor that
  this process's devices hold (each distinct slice once), in the variable's dtype."""
  dtype = var.get_value().dtype
  spec = sharding_lib.logical_to_spec(var.get_metadata().get("axes"), var.shape, mesh)
  cache: dict = {}

  def read(index):          # slices into var.shape; the file holds the transpose if asked
    key = tuple((s.start, s.stop) for s in index)
    if key not in cache:
      x = tensor_slice[tuple(reversed(index)) if transpose else tuple(index)]
      cache[key] = np.ascontiguousarray(x.T if transpose else x).astype(dtype)
    return cache[key]

  return jax.make_array_from_callback(tuple(var.shape),
                                      jax.sharding.NamedSharding(mesh, spec), read)


def _set(var: nnx.Variable, x: jax.Array, mesh: jax.sharding.Mesh | None):
  x = jnp.asarray(x, var.get_value().dtype)
  if mesh is not None:
    spec = sharding_lib.logical_to_spec(var.get_metadata().get("axes"), x.shape, mesh)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  var.set_value(x)


# ---------------------------------------------------------------------------- densify


def has_nonlinear_factors(layer: nnx.Module) -> bool:
  """Whether a projection applies an activation between its factors (LOST and CoLA with
  silu): then no single matrix equals it, and it has no HF LLaMA form."""
  return (isinstance(layer, (lost_layers.LOSTLinear, layers_lib.LowRankLinear))
          and layer.act is not layers_lib.ACTIVATIONS["identity"])


def _matmul_t(a_NxR: jax.Array, b_MxR: jax.Array) -> jax.Array:
  return jnp.matmul(a_NxR.astype(jnp.float32), b_MxR.astype(jnp.float32).T,
                    precision=jax.lax.Precision.HIGHEST)


def dense_kernel(layer: nnx.Module) -> jax.Array:
  """The float32 kernel [n, m] with x @ kernel == layer(x); errors if the layer is nonlinear."""
  if isinstance(layer, layers_lib.DenseLinear):
    return layer.kernel[...].astype(jnp.float32)
  n, m = layer.in_features, layer.out_features
  name = type(layer).__name__
  if has_nonlinear_factors(layer):
    raise ValueError(f"{name} has a nonlinear activation between its factors (silu: LOST/CoLA), "
                     "so no dense kernel reproduces it and it cannot be exported as a LLaMA. "
                     "Fix: train with model.linear.activation='identity' to export.")
  if isinstance(layer, layers_lib.LowRankLinear):
    return _matmul_t(layer.a[...], layer.b[...])
  if isinstance(layer, lost_layers.LOSTLinear):
    # x[..., I] @ V == x @ S with S's rows I set to V (add keeps repeated indices exact).
    sparse = jnp.zeros((n, m), jnp.float32).at[layer.indices[...]].add(
        layer.values[...].astype(jnp.float32))
    return layer.gamma * _matmul_t(layer.a[...], layer.b[...]) + (1.0 - layer.gamma) * sparse
  if isinstance(layer, layers_lib.SLTrainLinear):
    sparse = jnp.zeros((n * m,), jnp.float32).at[layer.indices[...]].add(
        layer.values[...].astype(jnp.float32)).reshape(n, m)
    return layer.scale * _matmul_t(layer.a[...], layer.b[...]) + sparse
  raise TypeError(f"dense_kernel does not know {name}. Fix: merge it into a DenseLinear first.")


def densify(model: Llama) -> Llama:
  """Replace every projection by the DenseLinear with its exact kernel, in place; returns model."""
  for path in linear_paths(model.cfg.n_layers):
    layer = get_path(model, path)
    if isinstance(layer, layers_lib.DenseLinear):
      continue
    try:
      kernel = dense_kernel(layer)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{_path_str(path)}: {e}") from None
    param_dtype = layer.a.get_value().dtype
    axes = (layer.a.get_metadata()["axes"][0], layer.b.get_metadata()["axes"][0])
    dense = nnx.eval_shape(lambda: layers_lib.DenseLinear(
        layer.in_features, layer.out_features, dtype=layer.dtype, param_dtype=param_dtype,
        axes=axes, backward=layer.backward, rngs=nnx.Rngs(0)))
    dense.kernel.set_value(kernel.astype(param_dtype))
    setattr(get_path(model, path[:-1]), path[-1], dense)
  cfg = model.cfg.copy_and_resolve_references()
  cfg.linear.kind = "dense"
  model.cfg = cfg
  return model


# ---------------------------------------------------------------------------- export


SHARD_BYTES = 5_000_000_000   # HF's default max_shard_size (5 GB)


def shard_names(sizes: dict[str, int], max_shard_bytes: int | None) -> dict[str, str]:
  """Tensor name -> file, in order: one model.safetensors, or HF's
  model-0000i-of-0000n.safetensors shards of at most max_shard_bytes (a tensor larger than
  that gets a shard of its own)."""
  groups: list[list[str]] = [[]]
  used = 0
  for name, size in sizes.items():
    if max_shard_bytes and groups[-1] and used + size > max_shard_bytes:
      groups.append([])
      used = 0
    groups[-1].append(name)
    used += size
  if len(groups) == 1:
    return {name: WEIGHTS_FILE for name in groups[0]}
  return {name: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
          for i, group in enumerate(groups) for name in group}


def is_tied(model: Llama) -> bool:
  """Whether the LM head is exactly the transposed embedding (a tied checkpoint's import)."""
  return bool(np.array_equal(np.asarray(model.lm_head.kernel[...]).T,
                             np.asarray(model.embed.embedding[...])))


def save_hf_llama(model: Llama, path: str, *, dtype: str = "bfloat16",
                  config_overrides: dict | None = None, tie: bool | None = None,
                  max_shard_bytes: int | None = SHARD_BYTES, progress: bool = False) -> dict:
  """Write config.json + model.safetensors (or HF-style shards and their index) loadable by
  LlamaForCausalLM.from_pretrained; files are mode 0644. Returns {"tensors", "bytes", "files"}.

  tie: write tie_word_embeddings=true and no lm_head.weight; None: tie exactly when the LM head
  equals the transposed embedding (a tied base, e.g. SmolLM2, imported and fine-tuned).
  """
  if dtype not in _DTYPES.values():
    raise ValueError(f"dtype={dtype!r} is not one of {tuple(_DTYPES.values())}.")
  cfg = model.cfg
  for p in linear_paths(cfg.n_layers):
    layer = get_path(model, p)
    if not isinstance(layer, layers_lib.DenseLinear):
      raise ValueError(f"{_path_str(p)} is a {type(layer).__name__}; a HF LLaMA stores dense "
                       "weights. Fix: call lost_jax.hf.densify(model) first (exact only for "
                       "identity activations) or merge LoRA adapters into the base kernels.")
  names = tensor_map(cfg.n_layers, configs_lib.Arch.of(cfg))
  covered = {attr for attr, _ in names.values()}
  for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if tuple(p) not in covered:
      raise ValueError(f"parameter {_path_str(p)} has no place in a HF checkpoint. Fix: "
                       "merge adapters into the base kernels (or drop them) before export.")
  tie = is_tied(model) if tie is None else tie
  if tie:
    names.pop("lm_head.weight")
  config = hf_config(cfg, dtype, {**(config_overrides or {}), "tie_word_embeddings": tie})
  itemsize = np.dtype(jnp.dtype(dtype)).itemsize
  sizes = {name: int(np.prod(get_path(model, attr).shape)) * itemsize
           for name, (attr, _) in names.items()}
  files = shard_names(sizes, max_shard_bytes)
  os.makedirs(path, exist_ok=True)
  bar = tqdm.tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, disable=not progress,
                  desc="writing tensors", mininterval=1.0)
  for file in dict.fromkeys(files.values()):     # one shard in host memory at a time
    tensors = {}
    for name in (n for n, f in files.items() if f == file):
      attr, transpose = names[name]
      x = np.asarray(jax.device_get(get_path(model, attr)[...].astype(dtype)))
      tensors[name] = np.ascontiguousarray(x.T if transpose else x)
    # The "format" tag is what save_pretrained writes; older transformers check it.
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    os.chmod(os.path.join(path, file), 0o644)
    bar.update(sum(sizes[n] for n in tensors))
  bar.close()
  written = {CONFIG_FILE: config}
  if len(set(files.values())) > 1:
    written[INDEX_FILE] = {"metadata": {"total_size": sum(sizes.values())},
                           "weight_map": dict(sorted(files.items()))}
  for fname, content in written.items():
    with open(os.path.join(path, fname), "w") as f:
      json.dump(content, f, indent=2)
    os.chmod(os.path.join(path, fname), 0o644)
  return {"tensors": len(files), "bytes": sum(sizes.values()),
          "files": sorted(set(files.values()))}


# ---------------------------------------------------------------------------- PEFT LoRA


ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def hf_module_name(layer: int, projection: str) -> str:
  """HF module path of lost_jax projection `projection` (q ... down) in block `layer`."""
  if projection in _ATTN:
    return f"model.layers.{layer}.self_attn.{_ATTN[projection]}"
  return f"model.layers.{layer}.mlp.{_MLP[projection]}"


def save_peft_lora(adapters: dict[tuple[int, str], tuple[Any, Any]], path: str, *,
                   rank: int, alpha: float, dropout: float = 0.0,
                   base_model: str | None = None, dtype: str = "float32") -> dict:
  """Write adapter_model.safetensors + adapter_config.json of a PEFT LoRA adapter.

  adapters: (layer, projection) -> (lora_a [n, r], lora_b [r, m]) in lost_jax's layout
  (y = x @ kernel + alpha / r * x @ a @ b); PEFT stores lora_A.weight [r, n] and lora_B.weight
  [m, r] (torch Linear layout) under `base_model.model.<module>` and scales by lora_alpha / r.
  """
  if dtype not in _DTYPES.values():
    raise ValueError(f"dtype={dtype!r} is not one of {tuple(_DTYPES.values())}.")
  tensors = {}
  for (layer, proj), (a_NxR, b_RxM) in sorted(adapters.items()):
    prefix = f"base_model.model.{hf_module_name(layer, proj)}"
    for key, x in ((f"{prefix}.lora_A.weight", a_NxR), (f"{prefix}.lora_B.weight", b_RxM)):
      tensors[key] = np.ascontiguousarray(np.asarray(jnp.asarray(x).astype(dtype)).T)
  targets = sorted({(_ATTN | _MLP)[proj] for _, proj in adapters})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
            "lora_alpha": float(alpha), "lora_dropout": float(dropout), "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "base_model_name_or_path": base_model, "modules_to_save": None,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, ADAPTER_CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  for fname in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
    os.chmod(os.path.join(path, fname), 0o644)
  return {"tensors": len(tensors), "bytes": sum(x.nbytes for x in tensors.values()),
          "files": [ADAPTER_WEIGHTS_FILE]}
