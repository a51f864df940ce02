"""LLaMA-architecture GGUF files (llama.cpp) -> lost_jax `Llama`, and its tokenizer as data.

Tensors are dequantised to float32 by the `gguf` package. GGUF stores each projection in HF's
[out, in] layout (ggml lists the dims reversed) under llama.cpp names, and llama.cpp's
converter permuted the rows of q and k (interleaved RoPE pairs): `unpermute_qk` restores HF's
rotate-half order. The model config comes from the `llama.*` metadata. The byte-level BPE
tokenizer of `tokenizer.ggml.*` is returned as tokenizer.json text (built with the
`tokenizers` library) beside its metadata; `lost_jax.data.tokenizer` makes the tokenizer.
"""

from __future__ import annotations

import struct

import jax
import ml_collections
import numpy as np
from flax import nnx

from lost_jax import configs as configs_lib
from lost_jax import progress
from lost_jax.formats import hf as hf_lib
from lost_jax.errors import UserError
from lost_jax.models.llama import Llama

_ATTN = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
_MLP = {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_CONTROL, _USER_DEFINED = 3, 4   # llama.cpp token types

# llama.cpp's pre-tokenizer names -> the split regex of the vocabulary (None: GPT-2's own).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("smollm", "gpt2", "default", "llama-bpe", "llama3", "llama-v3")


def open_reader(path: str):
  """The GGUF file at path, opened for reading; a UserError names a file that is not GGUF."""
  import gguf  # pylint: disable=g-import-not-at-top
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError, IndexError, KeyError, EOFError, struct.error) as e:
    # A file cut short (an interrupted download) fails as an IndexError of numpy's memmap.
    raise UserError(f"config.init.path={path!r} is not a readable GGUF file "
                    f"({type(e).__name__}: {e}). Fix: give a complete llama.cpp .gguf model "
                    "file (download it again if it was cut short)") from e


def metadata(reader) -> dict:
  """Scalar and array metadata of a GGUFReader as Python values."""
  return {name: field.contents() for name, field in reader.fields.items()
          if not name.startswith("GGUF.")}


def _refuse(path: str, what: str, fix: str):
  raise UserError(f"config.init.path={path!r}: {what}; lost_jax cannot represent it. Fix: {fix}")


# ---------------------------------------------------------------------------- config


def model_config(meta: dict, path: str = "") -> ml_collections.ConfigDict:
  """The dense lost_jax model config of `llama.*` metadata."""
  arch = meta.get("general.architecture")
  if arch != "llama":
    _refuse(path, f"general.architecture={arch!r} is not 'llama'",
            "use a LLaMA-architecture GGUF (LLaMA, SmolLM, Mistral-7B-v0.1 ...)")
  g = lambda key, default=None: meta.get(f"llama.{key}", default)
  d, heads = int(g("embedding_length")), int(g("attention.head_count"))
  rope_dim = g("rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != d // heads:
    _refuse(path, f"llama.rope.dimension_count={rope_dim} rotates part of each head "
            f"(head_dim {d // heads})", "use a model with full-head RoPE")
  cfg = configs_lib.model_config("quickstart")
  cfg.vocab_size = int(g("vocab_size") or len(meta["tokenizer.ggml.tokens"]))
  cfg.d_model, cfg.n_heads = d, heads
  cfg.ffn_dim = int(g("feed_forward_length"))
  cfg.n_layers = int(g("block_count"))
  cfg.n_kv_heads = int(g("attention.head_count_kv") or heads)
  cfg.rope_theta = float(g("rope.freq_base", 10_000.0))
  cfg.norm_eps = float(g("attention.layer_norm_rms_epsilon", 1e-5))
  kind = g("rope.scaling.type", "none")
  if kind == "linear":
    cfg.rope_scaling = configs_lib.rope_scaling_config("linear", float(g("rope.scaling.factor")))
  elif kind not in ("none", None):
    _refuse(path, f"llama.rope.scaling.type={kind!r}", "use a model with plain or linear RoPE")
  cfg.linear = configs_lib.linear_config("dense")
  configs_lib.validate_model(cfg)
  return cfg


def unpermute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (interleaved pairs -> HF rotate-half halves).

  llama.cpp wrote w.reshape(H, 2, hd/2, in).swapaxes(1, 2): row (h, j, c) of the file is
  HF row (h, c, j); this is the inverse.
  """
  out, inp = w_OxI.shape
  return (w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2)
          .reshape(out, inp))


def tensor_map(n_layers: int) -> dict[str, tuple[tuple[str | int, ...], bool]]:
  """GGUF tensor name -> (HF tensor name's lost_jax path, transposed?)."""
  names = {
      "token_embd.weight": ("model.embed_tokens.weight"),
      "output_norm.weight": ("model.norm.weight"),
      "output.weight": ("lm_head.weight"),
  }
  for i in range(n_layers):
    b, p = f"blk.{i}.", f"model.layers.{i}."
    names[b + "attn_norm.weight"] = p + "input_layernorm.weight"
    names[b + "ffn_norm.weight"] = p + "post_attention_layernorm.weight"
    for ours, theirs in _ATTN.items():
      names[f"{b}{theirs}.weight"] = f"{p}self_attn.{hf_lib._ATTN[ours]}.weight"
    for ours, theirs in _MLP.items():
      names[f"{b}{theirs}.weight"] = f"{p}mlp.{hf_lib._MLP[ours]}.weight"
  hf_map = hf_lib.tensor_map(n_layers)
  return {g: hf_map[h] for g, h in names.items()}


def _dequantize(tensor) -> np.ndarray:
  """float32 array in HF [out, in] layout (ggml lists dims innermost first)."""
  import gguf  # pylint: disable=g-import-not-at-top
  x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  return np.asarray(x, np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def load_gguf_llama(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                    mesh: jax.sharding.Mesh | None = None) -> Llama:
  """A dense lost_jax Llama holding a LLaMA-architecture GGUF model (any gguf quant type)."""
  reader = open_reader(path)
  meta = {k: v for k, v in metadata(reader).items() if not k.startswith("tokenizer.")}
  meta["tokenizer.ggml.tokens"] = reader.fields["tokenizer.ggml.tokens"].data
  cfg = model_config(meta, path)
  cfg.dtype, cfg.param_dtype = dtype, param_dtype
  names = tensor_map(cfg.n_layers)
  tensors = {t.name: t for t in reader.tensors if t.name != "rope_freqs.weight"}
  if "rope_freqs.weight" in {t.name for t in reader.tensors}:
    _refuse(path, "it stores RoPE frequency factors (rope_freqs.weight, LLaMA-3.1 style)",
            "load the HF checkpoint directory instead (config.json rope_scaling is read)")
  tied = "output.weight" not in tensors
  if tied:
    names.pop("output.weight")
  missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
  if missing or unexpected:
    name = (missing or unexpected)[0]
    raise UserError(f"config.init.path={path!r}: tensor {name!r} is "
                    f"{'missing' if missing else 'unexpected'} for a {cfg.n_layers}-layer "
                    "LLaMA per its metadata. Fix: check the file is a complete llama GGUF.")
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  head_dim = cfg.d_model // cfg.n_heads
  for name, (attr, transpose) in progress.track(list(names.items()), "loading GGUF base",
                                                "tensor"):
    x = _dequantize(tensors[name])
    if name.endswith("attn_q.weight"):
      x = unpermute_qk(x, cfg.n_heads)
    elif name.endswith("attn_k.weight"):
      x = unpermute_qk(x, cfg.n_kv_heads)
    var = hf_lib.get_path(model, attr)
    want = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
    if x.shape != want:
      raise UserError(f"config.init.path={path!r}: tensor {name!r} is {x.shape} but the "
                      f"metadata implies {want} (head_dim {head_dim}). Fix: check the file.")
    hf_lib._set(var, x.T if transpose else x, mesh)
  if tied:
    hf_lib._set(model.lm_head.kernel, model.embed.embedding[...].T, mesh)
  return model


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_json(meta: dict, path: str = "") -> str:
  """tokenizer.json text of the byte-level BPE described by `tokenizer.ggml.*` metadata."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    _refuse(path, f"tokenizer.ggml.model={kind!r} is not a byte-level BPE (gpt2)",
            "set config.data.tokenizer to the model's tokenizer.model or tokenizer.json")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    _refuse(path, f"tokenizer.ggml.pre={pre!r} is a pre-tokenizer lost_jax does not know",
            f"set config.data.tokenizer to the model's tokenizer.json (known: {PRE_TOKENIZERS})")
  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                        fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in (
      "llama-bpe", "llama3", "llama-v3"))
  if pre == "smollm":     # llama.cpp: digits one by one, then GPT-2's split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("llama-bpe", "llama3", "llama-v3"):
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  types = list(meta.get("tokenizer.ggml.token_type", []))
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types) if k == _CONTROL])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, types) if k == _USER_DEFINED])
  return tok.to_str()


def tokenizer_metadata(path: str) -> dict:
  """The `tokenizer.*` metadata of a GGUF file as Python values."""
  return {k: v for k, v in metadata(open_reader(path)).items() if k.startswith("tokenizer.")}


def chat_template(path: str) -> str:
  """The Jinja chat template in the metadata ('' if none)."""
  field = open_reader(path).fields.get("tokenizer.chat_template")
  return "" if field is None else field.contents()
