"""Pre-training document sources (`config.data.source`): streams of text, one per document.

- "stdlib": the running interpreter's Python standard library (module sources and the
  `pydoc_data.topics` help texts); needs no download. Documents are split into train and
  validation by a hash of their id (`eval_fraction`).
- "files": local .txt / .jsonl / .json(.gz) files in C4's record layout (`{"text": ...}` per
  line), e.g. a local copy of C4; a .txt file is one document. Validation is `eval_files`, or
  when that is empty, a hash split of `files`. The head of every file is read before training,
  so a bad file fails at once.
- "tfds": a TFDS dataset (`c4/en`) read by random access through `tfds.data_source`; it must
  be prepared in ArrayRecord format.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from typing import Any, Callable, Iterator

import grain

from lost_jax.errors import UserError

SOURCES = ("stdlib", "files", "tfds")

_PROBE_RECORDS = 64          # records read per file before training to catch bad inputs.
_MAX_OPEN_FILES = 16         # files interleaved at once when streaming.
# Excluded from the stdlib corpus: third-party packages, test suites, codec tables (generated
# code) and pydoc_data (its help topics are added as separate documents).
_STDLIB_SKIP_TOP = ("site-packages", "dist-packages", "test", "encodings", "pydoc_data")
_STDLIB_SKIP_ANY = ("tests", "idle_test", "__pycache__")


def fail(field: str, msg: str, fix: str):
  """Raise the UserError of a bad `config.data.<field>`."""
  raise UserError(f"config.data.{field}: {msg}. Fix: {fix}")


# ----------------------------------------------------------------------------------------------
# Stdlib corpus.


@functools.lru_cache(maxsize=None)
def stdlib_document_ids() -> tuple[str, ...]:
  """Sorted ids of the stdlib corpus: 'lib:<relative path>' and 'topic:<pydoc topic>'."""
  root = sysconfig.get_paths()["stdlib"]
  ids = []
  for d, dirs, files in os.walk(root):
    rel = os.path.relpath(d, root)
    dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_ANY
                     and not (rel == "." and x in _STDLIB_SKIP_TOP))
    for f in files:
      if f.endswith(".py"):
        ids.append("lib:" + os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/"))
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  ids += ["topic:" + k for k in pydoc_data.topics.topics]
  return tuple(sorted(ids))


def read_stdlib_document(doc_id: str) -> str:
  """Text of one stdlib document id."""
  kind, _, name = doc_id.partition(":")
  if kind == "topic":
    import pydoc_data.topics  # pylint: disable=g-import-not-at-top
    return pydoc_data.topics.topics[name]
  path = os.path.join(sysconfig.get_paths()["stdlib"], *name.split("/"))
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def hash_fraction(doc_id: str) -> float:
  """Uniform number in [0, 1) from a document id; stable across processes and runs."""
  digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def in_eval_split(doc_id: str, eval_fraction: float) -> bool:
  return hash_fraction(doc_id) < eval_fraction


def stdlib_split(eval_fraction: float, split: str) -> list[str]:
  """Document ids of the 'train' or 'eval' split of the stdlib corpus, in sorted order."""
  want_eval = split == "eval"
  return [i for i in stdlib_document_ids() if in_eval_split(i, eval_fraction) == want_eval]


class _Texts:
  """Random-access texts from ids and a reader (picklable for grain workers)."""

  def __init__(self, ids: list[str], read: Callable[[str], str]):
    self._ids, self._read = ids, read

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, i: int) -> str:
    return self._read(self._ids[i])


# ----------------------------------------------------------------------------------------------
# Local files.


def _is_gzip(path: str) -> bool:
  return path.endswith(".gz")


def _is_txt(path: str) -> bool:
  return path.removesuffix(".gz").endswith(".txt")


def _raw_records(path: str) -> Iterator[str]:
  """Raw records of a file: its lines (JSONL), or the whole file (.txt)."""
  opener = gzip.open if _is_gzip(path) else open
  with opener(path, "rt", encoding="utf-8") as f:
    if _is_txt(path):
      yield f.read()
    else:
      yield from f


def _record_text(path: str, raw: str) -> str | None:
  """Text of one raw record; None for blank lines and records without a 'text' string."""
  if _is_txt(path):
    return raw
  raw = raw.strip()
  if not raw:
    return None
  rec = json.loads(raw)
  text = rec.get("text") if isinstance(rec, dict) else None
  return text if isinstance(text, str) else None


_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError)


def _read_error(field: str, path: str, index: int, err: Exception):
  fail(field, f"cannot read {path} (record {index}): {type(err).__name__}: {err}",
       "check the file is valid UTF-8 text, JSON lines, or gzip of either, and not truncated")


class _FileDocs(grain.IterDataset):
  """Texts of one local file, streamed, keeping records selected by `keep(doc_id, index)`."""

  def __init__(self, path: str, keep: Callable[[str, int], bool], field: str):
    super().__init__()
    self.path, self.keep, self.field = path, keep, field

  def __iter__(self) -> grain.DatasetIterator:
    return _FileDocsIterator(self)

  def __str__(self) -> str:
    return f"_FileDocs({self.path})"


class _FileDocsIterator(grain.DatasetIterator):
  """Streams one file; its state is the number of records consumed (resume re-skips them)."""

  def __init__(self, ds: _FileDocs):
    super().__init__()
    self._ds = ds
    self._consumed = 0
    self._records = None
    self._name = os.path.basename(ds.path)

  def _open(self):
    self._records = _raw_records(self._ds.path)
    try:
      for _ in range(self._consumed):
        next(self._records)
    except StopIteration:
      pass
    except _READ_ERRORS as e:
      _read_error(self._ds.field, self._ds.path, self._consumed, e)

  def __next__(self) -> str:
    if self._records is None:
      self._open()
    while True:
      index = self._consumed
      try:
        text = _record_text(self._ds.path, next(self._records))
      except _READ_ERRORS as e:
        _read_error(self._ds.field, self._ds.path, index, e)
      self._consumed += 1
      if text is not None and self._ds.keep(f"{self._name}:{index}", index):
        return text

  def get_state(self) -> dict[str, Any]:
    return {"consumed": self._consumed}

  def set_state(self, state: dict[str, Any]) -> None:
    if self._records is not None:
      self._records.close()
    self._consumed, self._records = int(state["consumed"]), None


def _glob_files(pattern: str, field: str) -> list[str]:
  if not pattern:
    fail(field, "is empty but source='files'", "set it to a glob of .txt/.jsonl/.json(.gz) "
         "files, e.g. '/data/c4/en/c4-train.*.json.gz'")
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(f))
  if not files:
    fail(field, f"the glob {pattern!r} matches no file", "check the path and the pattern")
  return files


def _keep_fn(eval_fraction: float | None, want_eval: bool, shard: tuple[int, int]):
  """Record filter: the hash split (None: keep all) and a record-level process shard."""
  return functools.partial(_keep, eval_fraction, want_eval, shard)


def _keep(eval_fraction, want_eval, shard, doc_id, index) -> bool:
  if index % shard[1] != shard[0]:
    return False
  return eval_fraction is None or in_eval_split(doc_id, eval_fraction) == want_eval


def _shard_files(files: list[str], process_index: int, process_count: int):
  """Whole files per process when there are enough; otherwise every k-th record of each."""
  if len(files) >= process_count:
    return files[process_index::process_count], (0, 1)
  return files, (process_index, process_count)


def _probe_files(files: list[str], keep, field: str) -> None:
  """Read the head of every file so a bad source fails before training, not hours into it."""
  selected, complete = 0, True
  for path in files:
    if os.path.getsize(path) == 0:
      fail(field, f"{path} is empty", "remove it from the glob or regenerate it")
    texts, index = 0, 0
    records = _raw_records(path)
    try:
      for index, raw in enumerate(records):
        if index >= _PROBE_RECORDS:
          complete = False
          break
        text = _record_text(path, raw)
        if text is None:
          continue
        texts += 1
        selected += bool(text) and keep(f"{os.path.basename(path)}:{index}", index)
    except _READ_ERRORS as e:
      _read_error(field, path, index, e)
    finally:
      records.close()
    if not texts:
      fail(field, f"{path} has no record with a 'text' string in its first "
           f"{_PROBE_RECORDS} lines", 'give JSON lines in C4 layout {"text": ...} or .txt files')
  if not selected and not (complete or _any_selected(files, keep)):
    complete = True
  if complete and not selected:
    fail(field, f"the {len(files)} file(s) hold no non-empty document for this split and "
         "process", "add data, or change config.data.eval_fraction")


def _any_selected(files: list[str], keep) -> bool:
  """Whether any record past the probed head is a non-empty document this split keeps.

  Reached only when every probed head held none (e.g. files of empty strings): reading on
  until the first usable document costs little on good data and turns a stream that would
  filter forever into an error at start-up.
  """
  for path in files:
    records = _raw_records(path)
    try:
      for index, raw in enumerate(records):
        if index < _PROBE_RECORDS:
          continue
        text = _record_text(path, raw)
        if text and keep(f"{os.path.basename(path)}:{index}", index):
          return True
    except _READ_ERRORS:
      return True   # the stream reports a damaged record where it meets it
    finally:
      records.close()
  return False


def _file_stream(files: list[str], keep, field: str, *, seed: int | None,
                 window: int) -> grain.IterDataset:
  """Documents of `files` streamed: shuffled file order, interleaved, shuffled within a window
  of documents and repeated when a seed is given; in sorted order once otherwise."""
  ds = grain.MapDataset.source(files)
  if seed is not None:
    ds = ds.shuffle(seed).repeat(None)
  ds = ds.map(functools.partial(_FileDocs, keep=keep, field=field))
  cycle = min(len(files), _MAX_OPEN_FILES) if seed is not None else 1
  out = grain.experimental.InterleaveIterDataset(ds, cycle_length=cycle)
  if seed is not None:
    out = grain.experimental.WindowShuffleIterDataset(out, window_size=window, seed=seed)
  return out


# ----------------------------------------------------------------------------------------------
# TFDS.


class _TfdsTexts:
  """Random-access 'text' field of a TFDS data source (ArrayRecord)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> str:
    text = self._source[i]["text"]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _tfds_texts(data_cfg, split: str) -> _TfdsTexts:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_cfg.tfds_name
  if name.split("/")[0].split(":")[0] == "c4":
    # Registers the builder class without TensorFlow; `tfds.testing.mock_data` needs it.
    import tensorflow_datasets.text.c4  # pylint: disable=g-import-not-at-top,unused-import
  try:
    source = tfds.data_source(name, split=split, data_dir=data_cfg.tfds_data_dir or None,
                              download=False)
    n = len(source)
  except Exception as e:  # pylint: disable=broad-except
    fail("tfds_name", f"cannot open {name!r} split {split!r} as a random-access source "
         f"(tfds_data_dir={data_cfg.tfds_data_dir!r}): {type(e).__name__}: {e}",
         "prepare it in ArrayRecord format (`tfds build c4/en --file_format=array_record "
         "--data_dir=DIR`), set config.data.tfds_data_dir=DIR, or use source='files'")
  if n == 0:
    fail("tfds_name", f"{name!r} split {split!r} is empty", "check the split name")
  return _TfdsTexts(source)


# ----------------------------------------------------------------------------------------------
# One split of the configured source.


def source_texts(data_cfg, split: str, process_index: int, process_count: int, *,
                 seed: int | None) -> grain.IterDataset:
  """Texts of this process's shard of a split ('train' or 'eval'): shuffled and repeated
  forever when a seed is given, in a fixed order once otherwise."""
  src = data_cfg.source
  if src == "files":
    # With eval_files every record of `files` trains; otherwise a hash split holds some out.
    held_out = bool(data_cfg.get("eval_files"))
    field = "eval_files" if split == "eval" and held_out else "files"
    files = _glob_files(data_cfg[field], field)
    frac = None if held_out else data_cfg.eval_fraction
    files, shard = _shard_files(files, process_index, process_count)
    keep = _keep_fn(frac, split == "eval", shard)
    _probe_files(files, keep, field)
    return _file_stream(files, keep, field, seed=seed, window=data_cfg.shuffle_window)

  if src == "stdlib":
    ids = stdlib_split(data_cfg.eval_fraction, split)
    if not ids:
      fail("eval_fraction", f"the stdlib {split} split is empty at eval_fraction="
           f"{data_cfg.eval_fraction}", "use e.g. 0.05")
    texts = _Texts(ids, read_stdlib_document)
    field = "eval_fraction"
  else:
    texts = _tfds_texts(data_cfg, data_cfg.eval_split if split == "eval"
                        else data_cfg.train_split)
    field = "eval_split" if split == "eval" else "train_split"
  ds = grain.MapDataset.source(texts)[process_index::process_count]
  if not len(ds):
    fail(field, f"process {process_index} of {process_count} gets no {split} document",
         "use a larger split")
  if seed is not None:
    ds = ds.shuffle(seed).repeat(None)
  return ds.to_iter_dataset()
