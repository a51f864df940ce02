"""GGUF files (llama.cpp) -> a transformers config dict and HF-named float32 tensors, a
lost_jax `Llama`, and the tokenizer the metadata describes.

`read` gives what a Hugging Face checkpoint would hold: the config dict of the
`{arch}.*` metadata (llama, qwen2, qwen3, gemma3; llama.cpp's fixed values where a file is
silent) and the tensors under HF names (the gguf package's name map), dequantised by the `gguf`
package in HF's [out, in] layout, with llama.cpp's conversions undone: LLaMA's q/k row
permutation (`unpermute_qk`) and Gemma's norm weights stored as 1 + w. The tokenizer of
`tokenizer.ggml.*` (a byte-level BPE, or Gemma's SentencePiece BPE) is returned as
tokenizer.json text built with the `tokenizers` library; `lost_jax.data.tokenizer` makes the
tokenizer.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from lost_jax.formats import gguf_file
from lost_jax.formats import hf as hf_lib
from lost_jax.errors import UserError
from lost_jax.models.llama import Llama

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4   # llama.cpp token types
_SPACE = "\u2581"   # SentencePiece's space

# llama.cpp's pre-tokenizer names -> the split regex of the vocabulary (None: GPT-2's own).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("smollm", "gpt2", "default", "llama-bpe", "llama3", "llama-v3")


def open_reader(path: str) -> gguf_file.GGUFFile:
  """The GGUF file at path, parsed (once per process while it is unchanged); a UserError names
  a file that is not GGUF."""
  try:
    stat = os.stat(path)
    return _parsed(path, stat.st_mtime_ns, stat.st_size)
  except (ValueError, OSError, IndexError, KeyError, EOFError, struct.error) as e:
    # A file cut short (an interrupted download) ends before its tensors' data.
    raise UserError(f"config.init.path={path!r} is not a readable GGUF file "
                    f"({type(e).__name__}: {e}). Fix: give a complete llama.cpp .gguf model "
                    "file (download it again if it was cut short)") from e


@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int) -> gguf_file.GGUFFile:
  del mtime_ns, size   # the cache key: a rewritten file is parsed again
  return gguf_file.GGUFFile(path)


def metadata(reader: gguf_file.GGUFFile, tokenizer: bool = True) -> dict:
  """The metadata of a parsed GGUF file (without `tokenizer.*` unless `tokenizer`)."""
  return {name: value for name, value in reader.fields.items()
          if tokenizer or not name.startswith("tokenizer.")}


def _refuse(path: str, what: str, fix: str):
  raise UserError(f"config.init.path={path!r}: {what}; lost_jax cannot represent it. Fix: {fix}")


# ---------------------------------------------------------------------------- config

# GGUF general.architecture -> (transformers model_type, its CausalLM class). llama.cpp writes
# Mistral (v0.1-v0.3) as 'llama' with no sliding window: it loads as the LLaMA llama.cpp runs.
# A field is set only where the family's transformers config has it.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# llama.cpp's fixed Gemma 3 layout (llama-model.cpp) where the file states none: every 6th
# layer global, the local (sliding-window) layers at RoPE base 10k.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10_000.0
_REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


def hf_config(meta: dict, tensor_names=(), path: str = "") -> dict:
  """The transformers config dict (config.json contents) of a GGUF file's metadata.

  meta: `metadata(reader)`; tensor_names: the file's tensor names (a missing output.weight
  means tied embeddings).
  """
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    _refuse(path, f"general.architecture={arch!r} is not one lost_jax reads",
            f"use a GGUF of architecture {', '.join(ARCHITECTURES)}, or the model's Hugging "
            "Face directory")
  g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  needed = _REQUIRED + (("attention.sliding_window",) if arch == "gemma3" else ())
  missing = [f"{arch}.{key}" for key in needed if g(key) is None]
  if missing:
    raise UserError(f"config.init.path={path!r}: metadata {', '.join(missing)} missing. Fix: "
                    "give a complete llama.cpp .gguf model file")
  d, heads = int(g("embedding_length")), int(g("attention.head_count"))
  head_dim = int(g("attention.key_length") or d // heads)
  if int(g("attention.value_length") or head_dim) != head_dim:
    _refuse(path, f"{arch}.attention.value_length={g('attention.value_length')} differs from "
            f"key_length={head_dim}", "use a model whose value heads match its key heads")
  rope_dim = g("rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != head_dim:
    _refuse(path, f"{arch}.rope.dimension_count={rope_dim} rotates part of each head "
            f"(head_dim {head_dim})", "use a model with full-head RoPE")
  if "rope_freqs.weight" in tensor_names:
    _refuse(path, "it stores RoPE frequency factors (rope_freqs.weight, LLaMA-3.1 style)",
            "load the HF checkpoint directory instead (config.json rope_scaling is read)")
  model_type, cls = ARCHITECTURES[arch]
  get_id = lambda key: (None if meta.get(f"tokenizer.ggml.{key}") is None
                        else int(meta[f"tokenizer.ggml.{key}"]))
  theta = float(g("rope.freq_base", 10_000.0))
  hf = {
      "architectures": [cls],
      "model_type": model_type,
      "vocab_size": int(g("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
      "hidden_size": d,
      "intermediate_size": int(g("feed_forward_length")),
      "num_hidden_layers": int(g("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(g("attention.head_count_kv") or heads),
      "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": theta,
      "rope_scaling": _rope_scaling(g, path, arch),
      "max_position_embeddings": int(g("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "bos_token_id": get_id("bos_token_id"),
      "eos_token_id": get_id("eos_token_id"),
      "pad_token_id": get_id("padding_token_id"),
      "torch_dtype": "float32",
  }
  if arch != "qwen2":   # Qwen2: always q/k/v biases, head_dim = hidden_size / heads
    hf.update(head_dim=head_dim, attention_bias=False)
  if arch != "gemma3":
    hf["hidden_act"] = "silu"
  if arch == "llama":
    hf["mlp_bias"] = False
  if arch == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None)
  if arch == "gemma3":
    hf.update(_gemma3_fields(g, hf, theta))
  return hf


def _rope_scaling(g, path: str, arch: str) -> dict | None:
  """HF's rope_scaling of `{arch}.rope.scaling.*` (None: plain RoPE)."""
  kind = g("rope.scaling.type", "none")
  if kind in ("none", None):
    return None
  if kind != "linear":
    _refuse(path, f"{arch}.rope.scaling.type={kind!r}", "use a model with plain or linear RoPE")
  return {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}


def _gemma3_fields(g, hf: dict, theta: float) -> dict:
  """Gemma3TextConfig's own fields; llama.cpp's fixed values where the file is silent."""
  n = hf["num_hidden_layers"]
  pattern = g("attention.sliding_window_pattern", _GEMMA3_PATTERN)
  if not np.isscalar(pattern):   # per layer: True = sliding window
    local = [bool(p) for p in pattern]
  else:
    local = [(i + 1) % int(pattern) != 0 for i in range(n)]
  local_theta = float(g("rope.freq_base_swa", _GEMMA3_LOCAL_THETA))
  # llama.cpp's attention scale: 1/sqrt(head_dim), but 1/sqrt(d/heads) for the 62-layer 27B.
  scalar = hf["hidden_size"] // hf["num_attention_heads"] if n == 62 else hf["head_dim"]
  global_rope = {"rope_type": "default", "rope_theta": theta}
  if hf["rope_scaling"]:
    global_rope.update(hf["rope_scaling"])
  return {
      "hidden_activation": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": scalar,
      "sliding_window": int(g("attention.sliding_window")),
      "layer_types": ["sliding_attention" if s else "full_attention" for s in local],
      "rope_local_base_freq": local_theta,
      # transformers >= 5 reads these; older versions the two thetas above.
      "rope_parameters": {"full_attention": global_rope,
                          "sliding_attention": {"rope_type": "default",
                                                "rope_theta": local_theta}},
      "final_logit_softcapping": g("final_logit_softcapping"),
      "attn_logit_softcapping": g("attn_logit_softcapping"),
  }


def model_config(meta: dict, path: str = "") -> ml_collections.ConfigDict:
  """The dense lost_jax model config of a GGUF file's metadata."""
  cfg, _ = hf_lib._config_from_hf(hf_config(meta, (), path), path)
  return cfg


# ---------------------------------------------------------------------------- tensors


def unpermute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (interleaved pairs -> HF rotate-half halves).

  llama.cpp wrote w.reshape(H, 2, hd/2, in).swapaxes(1, 2): row (h, j, c) of the file is
  HF row (h, c, j); this is the inverse.
  """
  out, inp = w_OxI.shape
  return (w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2)
          .reshape(out, inp))


def hf_tensor_names(hf: dict) -> list[str]:
  """The HF parameter names of a llama / mistral / qwen2 / qwen3 / gemma3_text checkpoint."""
  kind = hf["model_type"]
  layer = ["input_layernorm", "post_attention_layernorm"]
  layer += [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in
                                                        ("gate", "up", "down")]
  if kind in ("qwen3", "gemma3_text"):
    layer += ["self_attn.q_norm", "self_attn.k_norm"]
  if kind == "gemma3_text":
    layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  names = [f"model.layers.{i}.{p}.weight" for i in range(hf["num_hidden_layers"])
           for p in layer]
  if kind == "qwen2" or hf.get("attention_bias"):
    names += [f"model.layers.{i}.self_attn.{p}_proj.bias"
              for i in range(hf["num_hidden_layers"]) for p in "qkv"]
  names += ["model.embed_tokens.weight", "model.norm.weight"]
  return names + ([] if hf["tie_word_embeddings"] else ["lm_head.weight"])


def gguf_names(hf: dict, arch: str) -> dict[str, str]:
  """HF parameter name -> the GGUF tensor name llama.cpp writes it under (the gguf package's
  own name map)."""
  import gguf  # pylint: disable=g-import-not-at-top
  key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  name_map = gguf.get_tensor_name_map(key, hf["num_hidden_layers"])
  out = {}
  for name in hf_tensor_names(hf):
    stem, suffix = name.rsplit(".", 1)
    out[name] = f"{name_map.get_name(stem)}.{suffix}"
  return out


class Tensors(Mapping):
  """HF-named float32 arrays of a GGUF file, in HF's layout and conventions, each dequantised
  when read (a 270M model is ~1 GB in float32: nothing is held)."""

  def __init__(self, reader: gguf_file.GGUFFile, hf: dict, path: str = ""):
    self.hf, self.path, self._file = hf, path, reader
    self.arch = reader.fields["general.architecture"]
    self.names = gguf_names(hf, self.arch)
    stored = reader.tensors
    missing = sorted(n for n in self.names.values() if n not in stored)
    unexpected = sorted(set(stored) - set(self.names.values()))
    if missing or unexpected:
      name = (missing or unexpected)[0]
      raise UserError(f"config.init.path={path!r}: tensor {name!r} is "
                      f"{'missing' if missing else 'unexpected'} for a "
                      f"{hf['num_hidden_layers']}-layer {self.arch} per its metadata. Fix: "
                      f"check the file is a complete {self.arch} GGUF.")

  def __getitem__(self, name: str) -> np.ndarray:
    gguf_name = self.names[name]
    x = self._file.array(gguf_name)
    # llama.cpp's conversions, undone: LLaMA's q/k rows interleaved for its RoPE; Gemma's
    # RMSNorm weights stored as (1 + w), the scale it multiplies by.
    if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = self.hf["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
      x = unpermute_qk(x, heads)
    if self.arch == "gemma3" and gguf_name.endswith("norm.weight"):
      x = x - np.float32(1.0)
    return x

  def __iter__(self):
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)


def read(path: str) -> tuple[dict, Tensors]:
  """(transformers config dict, HF-named float32 tensors) of a GGUF model file."""
  reader = open_reader(path)
  hf = hf_config(metadata(reader), list(reader.tensors), path)
  return hf, Tensors(reader, hf, path)


def load_gguf_llama(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                    mesh: jax.sharding.Mesh | None = None,
                    compute: Mapping[str, Any] | None = None) -> Llama:
  """A dense lost_jax Llama holding a GGUF model of any family `read` knows (any gguf quant
  type), imported as the HF checkpoint it describes; `compute` as in hf.load_hf_tensors."""
  hf, tensors = read(path)
  return hf_lib.load_hf_tensors(hf, list(tensors), tensors.__getitem__, dtype=dtype,
                                param_dtype=param_dtype, mesh=mesh,
                                where=f"config.init.path={path!r}", compute=compute)


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_json(meta: dict, path: str = "") -> str:
  """tokenizer.json text of the tokenizer `tokenizer.ggml.*` metadata describes: a byte-level
  BPE (`gpt2`) or a SentencePiece BPE with byte fallback (`llama`, as Gemma's)."""
  kind = meta.get("tokenizer.ggml.model")
  if kind == "gpt2":
    tok = _byte_level_bpe(meta, path)
  elif kind == "llama":
    tok = _sentencepiece_bpe(meta, path)
  else:
    _refuse(path, f"tokenizer.ggml.model={kind!r} is neither a byte-level BPE (gpt2) nor a "
            "SentencePiece BPE (llama)", "set config.data.tokenizer to the model's "
            "tokenizer.model or tokenizer.json")
  import tokenizers  # pylint: disable=g-import-not-at-top
  types = list(meta.get("tokenizer.ggml.token_type", []))
  vocab = tok.get_vocab()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, k in zip(meta["tokenizer.ggml.tokens"], types)
                          if k == _CONTROL])
  # Matched whole in the raw text (Gemma's newline / tab runs, HTML tags); a SentencePiece
  # whitespace run is matched in the vocabulary instead (_sentencepiece_bpe).
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, k in zip(meta["tokenizer.ggml.tokens"], types)
                  if k == _USER_DEFINED and t in vocab])
  return tok.to_str()


def _byte_level_bpe(meta: dict, path: str):
  """The byte-level BPE of a `gpt2` vocabulary (its merges and pre-tokenizer named)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
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
  return tok


def spm_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
  """BPE merges, best first, that reproduce SentencePiece BPE on this vocabulary.

  SentencePiece merges the adjacent pair whose concatenation is the best-scored piece:
  user-defined pieces first (matched whole), then normal pieces by falling score. Every way of
  cutting a piece into two vocabulary pieces is a merge of that rank (longer left part first).
  Control, byte and unused pieces are never the result of a merge.
  """
  ids = {t: i for i, t in enumerate(tokens)}
  order = sorted((i for i, k in enumerate(types) if k in (_NORMAL, _USER_DEFINED)),
                 key=lambda i: (types[i] != _USER_DEFINED, -scores[i], i))
  merges = []
  for i in order:
    piece = tokens[i]
    merges += [(piece[:j], piece[j:]) for j in range(len(piece) - 1, 0, -1)
               if piece[:j] in ids and piece[j:] in ids]
  return merges


def _sentencepiece_bpe(meta: dict, path: str):
  """The SentencePiece BPE of a `llama` vocabulary with scores and byte fallback, without the
  dummy prefix (Gemma's): spaces are `▁` in the pieces, unknown characters their UTF-8 bytes
  (<0xNN> pieces)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers  # pylint: disable=g-import-not-at-top
  if meta.get("tokenizer.ggml.add_space_prefix", True):
    _refuse(path, "its SentencePiece tokenizer prepends a space (tokenizer.ggml."
            "add_space_prefix, LLaMA-2 style)", "set config.data.tokenizer to the model's "
            "tokenizer.model")
  # Whitespace-run pieces are stored with real spaces; in SentencePiece's text they are `▁`s.
  tokens = [_SPACE * len(t) if t and not t.strip(" ") else t
            for t in meta["tokenizer.ggml.tokens"]]
  types = list(meta["tokenizer.ggml.token_type"])
  unk = int(meta.get("tokenizer.ggml.unknown_token_id", -1))
  tok = tokenizers.Tokenizer(models.BPE(
      {t: i for i, t in enumerate(tokens)},
      spm_merges(tokens, list(meta["tokenizer.ggml.scores"]), types),
      unk_token=tokens[unk] if unk >= 0 else None, fuse_unk=True, byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", _SPACE)
  tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  return tok


def tokenizer_metadata(path: str) -> dict:
  """The `tokenizer.*` metadata of a GGUF file as Python values."""
  return {k: v for k, v in metadata(open_reader(path)).items() if k.startswith("tokenizer.")}


def chat_template(path: str) -> str:
  """The Jinja chat template in the metadata ('' if none)."""
  return open_reader(path).fields.get("tokenizer.chat_template", "")
