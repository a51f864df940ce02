"""Tokenizers: SentencePiece `.model` files, HF `tokenizer.json` files, GGUF metadata.

One interface (`Tokenizer`: encode, decode, bos/eos/pad ids, vocab size, whether prompts start
with BOS) over two backends: `SentencePieceTokenizer` (T5's, LLaMA-2's `.model`, or one trained
on the stdlib corpus) and `HFTokenizer` (the `tokenizers` library: a `tokenizer.json`, or the
byte-level BPE a LLaMA-architecture GGUF file describes in its `tokenizer.ggml.*` metadata).

With `config.data.tokenizer = ""` a BPE SentencePiece model of the requested vocab size is
trained once on a ~4 MB sample of the Python standard library (about a second) and cached in
`$LOST_JAX_CACHE` (default `~/.cache/lost_jax`), keyed by vocab size, Python version and the
held-out fraction: the sample is drawn from the training split only, so the tokenizer never
sees a validation document (`config.data.eval_fraction`).
"""

from __future__ import annotations

import abc
import io
import json
import os
import platform

import sentencepiece as spm

from lost_jax import files
from lost_jax.data import chat, sources
from lost_jax.errors import UserError

# Bump when the training recipe or the corpus selection changes, so old caches are not reused.
_RECIPE = 2
_SAMPLE_CHARS = 4_000_000
# Ids of the trained model follow T5's order for pad/eos/unk; bos exists but the data
# pipeline never inserts it (the anchors train without BOS).
_PAD, _EOS, _UNK, _BOS = 0, 1, 2, 3
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


class Tokenizer(abc.ABC):
  """What the data pipelines need of a tokenizer. Ids are plain ints; -1 means "none"."""

  name: str          # the config value it was loaded from ('' for the stdlib model)
  path: str          # the file read
  vocab_size: int    # every id the tokenizer can emit is < vocab_size
  bos_id: int
  eos_id: int
  pad_id: int
  add_bos: bool      # prompts start with bos_id (LLaMA) or not (T5, SmolLM2)
  chat_template: str = ""   # the Jinja chat template stored with it ('' if none)

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS (special-token text such as <|im_end|> maps to
    its id)."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Text of `ids`, special tokens dropped."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str:
    """The vocabulary entry of `token_id` (a special token's text, e.g. '<|im_end|>')."""

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model: encode/decode and the special ids the data pipeline needs."""

  def __init__(self, model_proto: bytes, name: str = "", path: str = ""):
    # name: the config.data.tokenizer value ('' for the stdlib model); path: the file read.
    self._proto, self.name, self.path = model_proto, name, path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id()          # -1 when the model has none (T5).
    self.add_bos = self.bos_id >= 0
    # LLaMA's model has no pad piece: pad with 0 then; padded positions have weight 0 and
    # segment id 0, so the id only has to be a valid embedding row.
    self.pad_id = max(self._sp.pad_id(), 0)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_token(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def __getstate__(self):  # SentencePieceProcessor does not pickle; grain workers need it.
    return {"proto": self._proto, "name": self.name, "path": self.path,
            "chat_template": self.chat_template}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["name"], state["path"])
    self.chat_template = state.get("chat_template", "")


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (tokenizer.json or built from GGUF) with its special ids."""

  def __init__(self, tok_json: str, *, bos_id: int, eos_id: int, pad_id: int, add_bos: bool,
               name: str = "", path: str = ""):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._json, self.name, self.path = tok_json, name, path
    self._tok = tokenizers.Tokenizer.from_str(tok_json)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
    self.pad_id = pad_id if pad_id >= 0 else max(eos_id, 0)

  @property
  def backend(self):
    """The `tokenizers.Tokenizer` itself."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_token(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id)) or ""

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, each token's (start, end) character offsets in `text`)."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def token_id(self, token: str) -> int:
    """Id of a vocabulary entry, or -1."""
    i = self._tok.token_to_id(token)
    return -1 if i is None else i

  def __getstate__(self):
    return {"json": self._json, "name": self.name, "path": self.path, "bos_id": self.bos_id,
            "eos_id": self.eos_id, "pad_id": self.pad_id, "add_bos": self.add_bos,
            "chat_template": self.chat_template}

  def __setstate__(self, state):
    self.__init__(state["json"], bos_id=state["bos_id"], eos_id=state["eos_id"],
                  pad_id=state["pad_id"], add_bos=state["add_bos"], name=state["name"],
                  path=state["path"])
    self.chat_template = state.get("chat_template", "")


def _token_text(value) -> str | None:
  """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _first(value) -> int:
  if isinstance(value, list):
    value = value[0] if value else None
  return -1 if value is None else int(value)


def load_tokenizer_json(path: str, name: str = "") -> HFTokenizer:
  """A HF tokenizer.json, its special tokens from the tokenizer_config.json (or config.json)
  beside it."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    text = f.read()
  try:
    tok = tokenizers.Tokenizer.from_str(text)
  except Exception as e:  # the library raises a bare Exception for a malformed file
    raise UserError(f"config.data.tokenizer: {path!r} is not a HF tokenizer.json ({e}). Fix: "
                    "give the tokenizer.json saved with the model") from e
  folder = os.path.dirname(path)
  tcfg, mcfg = {}, {}
  for fname, into in ((TOKENIZER_CONFIG, tcfg), ("config.json", mcfg)):
    if os.path.exists(os.path.join(folder, fname)):
      with open(os.path.join(folder, fname)) as f:
        into.update(json.load(f))

  def special(key: str) -> int:
    token = _token_text(tcfg.get(f"{key}_token"))
    if token is not None and tok.token_to_id(token) is not None:
      return tok.token_to_id(token)
    return _first(mcfg.get(f"{key}_token_id"))

  bos, eos, pad = special("bos"), special("eos"), special("pad")
  if "add_bos_token" in tcfg:
    add_bos = bool(tcfg["add_bos_token"]) and bos >= 0
  else:   # LLaMA-3 states it only in the post-processor: see whether it adds BOS.
    ids = tok.encode("a", add_special_tokens=True).ids
    add_bos = bos >= 0 and bool(ids) and ids[0] == bos
  return HFTokenizer(text, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos, name=name,
                     path=path)


def load_gguf_tokenizer(path: str, name: str = "") -> HFTokenizer:
  """The byte-level BPE tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes."""
  # Imported here: reading GGUF brings in the model code, which no other tokenizer needs.
  from lost_jax.formats import gguf  # pylint: disable=g-import-not-at-top
  meta = gguf.tokenizer_metadata(path)
  get = lambda key: int(meta.get(f"tokenizer.ggml.{key}", -1))
  bos = get("bos_token_id")
  return HFTokenizer(
      gguf.tokenizer_json(meta, path), bos_id=bos, eos_id=get("eos_token_id"),
      pad_id=get("padding_token_id"),
      add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos >= 0,
      name=name, path=path)


def load_sentencepiece(path: str, name: str = "") -> SentencePieceTokenizer:
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return SentencePieceTokenizer(proto, name, path)
  except RuntimeError as e:
    raise UserError(f"config.data.tokenizer: {path!r} is not a SentencePiece model ({e}). "
                    "Fix: give a .model file (e.g. T5's spiece.model or LLaMA's "
                    "tokenizer.model) or a HF tokenizer.json") from e


def from_path(path: str, name: str = "") -> Tokenizer | None:
  """The tokenizer a file or HF directory holds (tokenizer.json first, then tokenizer.model,
  a .gguf file's metadata), or None when a directory has none; with the chat template stored
  beside it (`chat.read_chat_template`)."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    for fname in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
      if os.path.exists(os.path.join(path, fname)):
        return from_path(os.path.join(path, fname), name)
    return None
  if path.endswith(".gguf"):
    tok = load_gguf_tokenizer(path, name)
  elif path.endswith(".json"):
    tok = load_tokenizer_json(path, name)
  else:
    tok = load_sentencepiece(path, name)
  tok.chat_template = chat.read_chat_template(path)
  return tok


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("LOST_JAX_CACHE") or "~/.cache/lost_jax")


def stdlib_model_path(vocab_size: int, heldout: float = 0.05) -> str:
  py = platform.python_version()
  return os.path.join(cache_dir(), f"stdlib_bpe_v{vocab_size}_py{py}_r{_RECIPE}"
                      f"_heldout{heldout:g}.model")


def training_document_ids(heldout: float) -> list[str]:
  """Ids of the stdlib documents the tokenizer is trained on: every k-th document of the
  training split at eval_fraction `heldout`, ~_SAMPLE_CHARS in all, in a fixed order."""
  ids = sources.stdlib_split(heldout, "train")
  stride = max(1, sum(len(sources.read_stdlib_document(i)) for i in ids) // _SAMPLE_CHARS)
  return ids[::stride]


def _training_lines(heldout: float) -> list[str]:
  """Non-blank lines of the tokenizer's training documents."""
  lines = []
  for doc_id in training_document_ids(heldout):
    text = sources.read_stdlib_document(doc_id)
    lines += [line for line in text.split("\n") if line.strip()]
  return lines


def train_stdlib_model(vocab_size: int, heldout: float = 0.05) -> bytes:
  """Serialized BPE SentencePiece model of `vocab_size` pieces trained on the stdlib sample
  (documents outside the validation split at eval_fraction `heldout`)."""
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines(heldout)), model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe", pad_id=_PAD, eos_id=_EOS, unk_id=_UNK, bos_id=_BOS,
        character_coverage=0.9995, split_digits=True, max_sentence_length=8192,
        # Keep code's layout: no whitespace folding or normalization, newline as a piece.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
        # One thread: the result depends on the thread count, and every host must agree.
        num_threads=1, minloglevel=2)
  except RuntimeError as e:
    raise UserError(
        f"config.model.vocab_size: cannot train a {vocab_size}-piece tokenizer on the stdlib "
        f"corpus ({e}). Fix: use a vocab size such as 4096 or 32000, or set "
        "config.data.tokenizer to a SentencePiece .model file") from e
  return out.getvalue()


def _write_cache(path: str, payload: bytes) -> None:
  """Store a trained tokenizer in the cache (atomically), or one error naming the cache."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write(path, payload)
  except OSError as e:
    raise UserError(f"the tokenizer cache {os.path.dirname(path)} cannot be written "
                    f"({e.strerror or e}). Fix: set LOST_JAX_CACHE to a writable directory "
                    "(default ~/.cache/lost_jax, under HOME)") from e


def stdlib_tokenizer(vocab_size: int, heldout: float = 0.05) -> Tokenizer:
  """The cached stdlib tokenizer of `vocab_size` pieces, trained on first use on documents
  outside the validation split at eval_fraction `heldout`."""
  path = stdlib_model_path(vocab_size, heldout)
  if os.path.exists(path):
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return SentencePieceTokenizer(proto, "", path)
    except RuntimeError:
      pass  # Unreadable cache entry (written by something else): train it again.
  proto = train_stdlib_model(vocab_size, heldout)
  _write_cache(path, proto)
  return SentencePieceTokenizer(proto, "", path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raise one clear ValueError when the tokenizer and the model disagree on the vocab size."""
  # A HF model's embedding may be padded past its tokenizer (Qwen, LLaMA-3 forks): fine, as
  # long as every id the tokenizer emits has a row.
  hf_padded = isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size < model_vocab_size
  if tokenizer.vocab_size != model_vocab_size and not hf_padded:
    raise UserError(
        f"config.model.vocab_size={model_vocab_size} but the tokenizer "
        f"(config.data.tokenizer={tokenizer.name!r}) has {tokenizer.vocab_size} pieces. Fix: "
        f"set config.model.vocab_size={tokenizer.vocab_size}, or set config.data.tokenizer "
        f"to a SentencePiece model with {model_vocab_size} pieces (or to '' to train one on "
        "the stdlib corpus at the model's size)")


def load_tokenizer(data_cfg, vocab_size: int) -> Tokenizer:
  """The tokenizer of `config.data.tokenizer` ('' = stdlib-trained; a SentencePiece .model, a
  tokenizer.json, a HF directory or a .gguf file), checked against `vocab_size`
  (config.model.vocab_size)."""
  path = data_cfg.tokenizer
  if not path:
    # Only a stdlib validation split can overlap the stdlib sample; other sources hold out
    # their own documents, and the default split keeps one tokenizer for them all.
    stdlib = data_cfg.get("source") == "stdlib"
    heldout = data_cfg.get("eval_fraction", 0.05) if stdlib else 0.05
    tok = stdlib_tokenizer(vocab_size, heldout)
  else:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
      raise UserError(f"config.data.tokenizer: {path!r} does not exist. Fix: give the path of "
                      "a SentencePiece .model file or a HF tokenizer.json, or '' to train one "
                      "on the stdlib corpus")
    tok = from_path(path, data_cfg.tokenizer)
    if tok is None:
      raise UserError(f"config.data.tokenizer: directory {path!r} has neither "
                      f"{TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}. Fix: give the tokenizer "
                      "file itself")
  check_vocab(tok, vocab_size)
  return tok
