"""SentencePiece tokenizer: a given `.model` (T5's, LLaMA's) or one trained on the stdlib corpus.

With `config.data.tokenizer = ""` a BPE SentencePiece model of the requested vocab size is
trained once on a ~4 MB sample of the Python standard library (about a second) and cached in
`$LOST_JAX_CACHE` (default `~/.cache/lost_jax`), keyed by vocab size and Python version.
"""

from __future__ import annotations

import io
import os
import platform
import tempfile

import sentencepiece as spm

from lost_jax import data as _data
from lost_jax.errors import UserError

# Bump when the training recipe or the corpus selection changes, so old caches are not reused.
_RECIPE = 1
_SAMPLE_CHARS = 4_000_000
# Ids of the trained model follow T5's order for pad/eos/unk; bos exists but the data
# pipeline never inserts it (the anchors train without BOS).
_PAD, _EOS, _UNK, _BOS = 0, 1, 2, 3


class Tokenizer:
  """A SentencePiece model: encode/decode and the special ids the data pipeline needs."""

  def __init__(self, model_proto: bytes, name: str = "", path: str = ""):
    # name: the config.data.tokenizer value ('' for the stdlib model); path: the file read.
    self._proto, self.name, self.path = model_proto, name, path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id()          # -1 when the model has none (T5).
    # LLaMA's model has no pad piece: pad with 0 then; padded positions have weight 0 and
    # segment id 0, so the id only has to be a valid embedding row.
    self.pad_id = max(self._sp.pad_id(), 0)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self):  # SentencePieceProcessor does not pickle; grain workers need it.
    return {"proto": self._proto, "name": self.name, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["name"], state["path"])

  def __repr__(self) -> str:
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("LOST_JAX_CACHE") or "~/.cache/lost_jax")


def stdlib_model_path(vocab_size: int) -> str:
  py = platform.python_version()
  return os.path.join(cache_dir(), f"stdlib_bpe_v{vocab_size}_py{py}_r{_RECIPE}.model")


def _training_lines() -> list[str]:
  """Non-blank lines of every k-th stdlib document, ~_SAMPLE_CHARS in all, in a fixed order."""
  ids = _data.stdlib_document_ids()
  texts = [_data.read_stdlib_document(i) for i in ids]
  stride = max(1, sum(map(len, texts)) // _SAMPLE_CHARS)
  lines = []
  for text in texts[::stride]:
    lines += [line for line in text.split("\n") if line.strip()]
  return lines


def train_stdlib_model(vocab_size: int) -> bytes:
  """Serialized BPE SentencePiece model of `vocab_size` pieces trained on the stdlib sample."""
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()), model_writer=out, vocab_size=vocab_size,
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


def _write_atomic(path: str, payload: bytes) -> None:
  """Write to a temporary file in the same directory, then rename: never a half file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def stdlib_tokenizer(vocab_size: int) -> Tokenizer:
  """The cached stdlib tokenizer of `vocab_size` pieces, trained on first use."""
  path = stdlib_model_path(vocab_size)
  if os.path.exists(path):
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return Tokenizer(proto, "", path)
    except RuntimeError:
      pass  # Unreadable cache entry (written by something else): train it again.
  proto = train_stdlib_model(vocab_size)
  _write_atomic(path, proto)
  return Tokenizer(proto, "", path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raise one clear ValueError when the tokenizer and the model disagree on the vocab size."""
  if tokenizer.vocab_size != model_vocab_size:
    raise UserError(
        f"config.model.vocab_size={model_vocab_size} but the tokenizer "
        f"(config.data.tokenizer={tokenizer.name!r}) has {tokenizer.vocab_size} pieces. Fix: "
        f"set config.model.vocab_size={tokenizer.vocab_size}, or set config.data.tokenizer "
        f"to a SentencePiece model with {model_vocab_size} pieces (or to '' to train one on "
        "the stdlib corpus at the model's size)")


def load_tokenizer(data_cfg, vocab_size: int) -> Tokenizer:
  """The tokenizer of `config.data.tokenizer` ('' = stdlib-trained), checked against
  `vocab_size` (config.model.vocab_size)."""
  path = data_cfg.tokenizer
  if not path:
    tok = stdlib_tokenizer(vocab_size)
  else:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise UserError(f"config.data.tokenizer: {path!r} does not exist. Fix: give the path of "
                      "a SentencePiece .model file, or '' to train one on the stdlib corpus")
    with open(path, "rb") as f:
      proto = f.read()
    try:
      tok = Tokenizer(proto, data_cfg.tokenizer, path)
    except RuntimeError as e:
      raise UserError(f"config.data.tokenizer: {path!r} is not a SentencePiece model ({e}). "
                      "Fix: give a .model file (e.g. T5's spiece.model or LLaMA's "
                      "tokenizer.model)") from e
  check_vocab(tok, vocab_size)
  return tok
