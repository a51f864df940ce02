"""A run's tokenizer as Hugging Face files: `tokenizer.json`, `tokenizer_config.json` (special
tokens, BOS handling, chat template) and `special_tokens_map.json`.

Every run writes them into `WORKDIR/tokenizer/` when it starts (`record_run_tokenizer`), so a
workdir holds the tokenizer it was trained with even when that tokenizer lives elsewhere (the
stdlib model in `$LOST_JAX_CACHE`, a GGUF file's metadata); export copies them next to the
weights. A SentencePiece model is converted to the `tokenizers` library's form
(`sentencepiece_json`), and the conversion is checked on a sample text before it is written.
"""

from __future__ import annotations

import json
import os
import re

from lost_jax import files
from lost_jax.data import tokenizer as tokenizer_lib
from lost_jax.errors import UserError

RUN_TOKENIZER_DIR = "tokenizer"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
FILES = (tokenizer_lib.TOKENIZER_JSON, tokenizer_lib.TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
_SPACE = "\u2581"   # SentencePiece's escaped space
# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE, _UNIGRAM = 2, 1
# What a conversion must reproduce id for id before it is written: code, prose, digits,
# runs of spaces and newlines, tabs, non-ASCII letters.
_CHECK_TEXT = ("\ndef f(x):\n    return x  +  12345  # total\n\n\tclass A:  pass\n"
               "The quick brown fox, 3.14 and 2,000 -- naive café über straße 東京.  \n  end ")


# ---------------------------------------------------------------- SentencePiece -> tokenizers


def _sp_merges(pieces: list, vocab: dict[str, int]) -> list[tuple[str, str]]:
  """BPE merges equivalent to SentencePiece's encoding: every split (a, b) of a normal piece
  into two mergeable pieces, ranked by the merged piece's id (SentencePiece orders BPE pieces
  by score, and merges the best-scoring adjacent pair first)."""
  mergeable = {p.piece for p in pieces if p.type == _NORMAL}
  ranked = []
  for p in pieces:
    if p.type != _NORMAL:
      continue
    for i in range(1, len(p.piece)):
      a, b = p.piece[:i], p.piece[i:]
      if a in mergeable and b in mergeable:
        ranked.append((vocab[p.piece], vocab[a], vocab[b], a, b))
  return [(a, b) for *_, a, b in sorted(ranked)]


def sentencepiece_json(proto: bytes, add_bos: bool) -> str:
  """tokenizer.json text of a SentencePiece BPE or unigram model (`add_bos`: the
  post-processor prepends its BOS, as lost_jax does for prompts)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  ts, ns = m.trainer_spec, m.normalizer_spec
  unsupported = [name for name, on in (
      ("treat_whitespace_as_suffix", ts.treat_whitespace_as_suffix),
      ("split_by_whitespace=false", not ts.split_by_whitespace),
      ("escape_whitespaces=false", not ns.escape_whitespaces),
      (f"model_type={ts.model_type}", ts.model_type not in (_BPE, _UNIGRAM))) if on]
  if unsupported:
    raise UserError(f"the SentencePiece tokenizer uses {unsupported[0]}, which lost_jax cannot "
                    "write as a HF tokenizer.json. Fix: give the model's own tokenizer.json "
                    "as config.data.tokenizer")
  pieces = list(m.pieces)
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  unk = next((i for i, p in enumerate(pieces) if p.type == _UNKNOWN), None)
  if ts.model_type == _BPE:
    model = models.BPE(vocab, _sp_merges(pieces, vocab), fuse_unk=True,
                       unk_token=None if unk is None else pieces[unk].piece,
                       byte_fallback=ts.byte_fallback)
  else:
    model = models.Unigram([(p.piece, p.score) for p in pieces], unk, ts.byte_fallback)
  tok = tokenizers.Tokenizer(model)
  steps = []
  if ns.precompiled_charsmap:
    steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
  if ns.remove_extra_whitespaces:
    steps += [normalizers.Strip(left=True, right=True),
              normalizers.Replace(tokenizers.Regex(" {2,}"), " ")]
  if ns.add_dummy_prefix:
    steps.append(normalizers.Prepend(_SPACE))
  steps.append(normalizers.Replace(" ", _SPACE))
  tok.normalizer = normalizers.Sequence(steps)
  # SentencePiece's words: a new one starts at each space (at a run of spaces when
  # whitespace-only pieces are allowed); pieces never cross a word.
  word = (f"{_SPACE}*[^{_SPACE}]+|{_SPACE}+" if ts.allow_whitespace_only_pieces
          else f"{_SPACE}[^{_SPACE}]*|[^{_SPACE}]+")
  split_word = pre_tokenizers.Split(tokenizers.Regex(word), behavior="isolated")
  # User-defined symbols (e.g. "\n") are never merged with a neighbour: isolated first.
  user = [p.piece for p in pieces if p.type == _USER_DEFINED]
  tok.pre_tokenizer = split_word if not user else pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex("|".join(re.escape(u) for u in user)),
                           behavior="isolated"), split_word])
  # Fuse before Strip: the dummy prefix is stripped once, from the whole text.
  steps = [decoders.Replace(_SPACE, " ")] + [decoders.ByteFallback()] * ts.byte_fallback
  steps.append(decoders.Fuse())
  if ns.add_dummy_prefix:
    steps.append(decoders.Strip(" ", 1, 0))
  tok.decoder = decoders.Sequence(steps)
  tok.add_special_tokens([tokenizers.AddedToken(p.piece, normalized=False, special=True)
                          for p in pieces if p.type in (_CONTROL, _UNKNOWN)])
  text = tok.to_str()
  if add_bos and ts.bos_id >= 0:
    text = _with_bos(text, pieces[ts.bos_id].piece, ts.bos_id)
  return text


def _with_bos(tok_json: str, bos: str, bos_id: int) -> str:
  """tok_json whose post-processor prepends BOS to every encoded text (kept if it has one)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import processors
  if json.loads(tok_json).get("post_processor"):
    return tok_json
  tok = tokenizers.Tokenizer.from_str(tok_json)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
  return tok.to_str()


# ---------------------------------------------------------------- the files


def end_of_turn_tokens(tok_json: str, chat_template: str) -> list[int]:
  """Ids of the special tokens a chat template closes a turn with (<|im_end|>, <|eot_id|>,
  <end_of_turn>, ...): special added tokens named like an end that the template uses."""
  added = json.loads(tok_json).get("added_tokens", [])
  return sorted(t["id"] for t in added if t.get("special") and t["content"] in chat_template
                and re.search(r"end|eot", t["content"], re.IGNORECASE))


def hf_files(tok: tokenizer_lib.Tokenizer, chat_template: str = "") -> dict[str, str]:
  """{file name: text} of the HF tokenizer files of a lost_jax tokenizer."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  if isinstance(tok, tokenizer_lib.HFTokenizer):
    tok_json = tok.__getstate__()["json"]
    if tok.add_bos:
      tok_json = _with_bos(tok_json, tok.backend.id_to_token(tok.bos_id), tok.bos_id)
  else:
    tok_json = sentencepiece_json(tok.__getstate__()["proto"], tok.add_bos)
  backend = tokenizers.Tokenizer.from_str(tok_json)
  _check_conversion(tok, backend)
  name = lambda i: backend.id_to_token(i) if i is not None and i >= 0 else None
  unk = getattr(getattr(backend, "model", None), "unk_token", None)
  special = {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
             "pad_token": name(tok.pad_id), "unk_token": unk}
  special = {k: v for k, v in special.items() if v is not None}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
            "add_bos_token": bool(tok.add_bos), "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
  if chat_template:
    config["chat_template"] = chat_template
  dump = lambda d: json.dumps(d, indent=2, ensure_ascii=False) + "\n"
  return {tokenizer_lib.TOKENIZER_JSON: tok_json, tokenizer_lib.TOKENIZER_CONFIG: dump(config),
          SPECIAL_TOKENS_MAP: dump(special)}


def _check_conversion(tok: tokenizer_lib.Tokenizer, backend) -> None:
  got = backend.encode(_CHECK_TEXT, add_special_tokens=False).ids
  want = tok.encode(_CHECK_TEXT)
  if got != want:
    raise UserError(f"the tokenizer {tok.path!r} does not convert exactly to a HF "
                    f"tokenizer.json (the ids of a sample text differ at position "
                    f"{next(i for i, (a, b) in enumerate(zip(got + [-1], want + [-1])) if a != b)}"
                    "). Fix: give the model's own tokenizer.json as config.data.tokenizer")


def write_files(folder: str, contents: dict[str, str]) -> None:
  """Each file of `contents` (name -> text) into folder (created), atomically one by one,
  mode 0644."""
  os.makedirs(folder, exist_ok=True)
  for fname, text in contents.items():
    files.atomic_write(os.path.join(folder, fname), text)


def chat_template_of(path: str) -> str:
  """The chat template stored with a tokenizer path ('' if none): a GGUF file's metadata, or
  the tokenizer_config.json / chat_template.jinja beside a tokenizer file or in a directory."""
  if not path:
    return ""
  path = os.path.expanduser(path)
  if path.endswith(".gguf"):
    from lost_jax.formats import gguf  # pylint: disable=g-import-not-at-top
    return gguf.chat_template(path)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  jinja = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  config = os.path.join(folder, tokenizer_lib.TOKENIZER_CONFIG)
  if os.path.exists(config):
    with open(config, encoding="utf-8") as f:
      template = json.load(f).get("chat_template") or ""
    return template if isinstance(template, str) else ""
  return ""


def check_run_tokenizer(workdir: str, tok: tokenizer_lib.Tokenizer, chat_template: str = "",
                        contents: dict[str, str] | None = None) -> None:
  """Refuse a tokenizer other than the one WORKDIR/tokenizer records (compared by content:
  a file replaced under the same name is another tokenizer); nothing when none is recorded.
  `contents`: hf_files(tok, chat_template), if already made."""
  folder = os.path.join(workdir, RUN_TOKENIZER_DIR)
  if not os.path.exists(os.path.join(folder, tokenizer_lib.TOKENIZER_JSON)):
    return
  for fname, text in (contents or hf_files(tok, chat_template)).items():
    try:
      with open(os.path.join(folder, fname), encoding="utf-8") as f:
        same = f.read() == text
    except OSError:
      same = False
    if not same:
      raise UserError(f"workdir {workdir} was trained with another tokenizer ({fname} in "
                      f"{folder} differs from that of config.data.tokenizer="
                      f"{tok.name!r}). Fix: use the tokenizer the run started with, or a new "
                      "--workdir")


def record_run_tokenizer(workdir: str, tok: tokenizer_lib.Tokenizer,
                         chat_template: str = "") -> str:
  """Write the run's tokenizer into WORKDIR/tokenizer (call on process 0 only); a resumed run
  whose configured tokenizer differs from the one recorded is refused (`check_run_tokenizer`,
  which a run calls before it writes anything). Returns the folder."""
  folder = os.path.join(workdir, RUN_TOKENIZER_DIR)
  contents = hf_files(tok, chat_template)
  if os.path.exists(os.path.join(folder, tokenizer_lib.TOKENIZER_JSON)):
    check_run_tokenizer(workdir, tok, chat_template, contents)
  else:   # tokenizer.json last: its presence says the folder is complete
    write_files(folder, dict(sorted(contents.items(),
                                    key=lambda kv: kv[0] == tokenizer_lib.TOKENIZER_JSON)))
  return folder


def load_run_tokenizer(workdir: str) -> tokenizer_lib.HFTokenizer:
  """The tokenizer recorded in WORKDIR/tokenizer; one error line when there is none."""
  path = os.path.join(workdir, RUN_TOKENIZER_DIR, tokenizer_lib.TOKENIZER_JSON)
  if not os.path.exists(path):
    raise UserError(f"workdir {workdir} has no {RUN_TOKENIZER_DIR}/"
                    f"{tokenizer_lib.TOKENIZER_JSON} (runs started before lost_jax recorded "
                    "their tokenizer). Fix: resume the run once with its config (it writes "
                    "the tokenizer), or copy the tokenizer files there")
  return tokenizer_lib.load_tokenizer_json(path, path)
