"""Pre-training data: document sources, tokenization, packing and batching with grain.

Sources (`config.data.source`):
- "stdlib": the running interpreter's Python standard library (module sources and the
  `pydoc_data.topics` help texts); needs no download. Documents are split into train and
  validation by a hash of their id (`eval_fraction`).
- "files": local .txt / .jsonl / .json(.gz) files in C4's record layout (`{"text": ...}` per
  line), e.g. a local copy of C4; a .txt file is one document. Validation is `eval_files`, or
  when that is empty, a hash split of `files`.
- "tfds": a TFDS dataset (`c4/en`) read by random access through `tfds.data_source`; it must
  be prepared in ArrayRecord format.

Every example is a dict of [seq_len] arrays: inputs, targets (the next token), positions
(restart at 0 per document), segment_ids (1.. per document, 0 on padding), weights (float32,
1 where the target is a real next token of the same document).
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from typing import Any, Callable, Iterator

import grain
import numpy as np

from lost_jax.errors import UserError

KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
SOURCES = ("stdlib", "files", "tfds")

_PROBE_RECORDS = 64          # records read per file before training to catch bad inputs.
_MAX_OPEN_FILES = 16         # files interleaved at once when streaming.
# Excluded from the stdlib corpus: third-party packages, test suites, codec tables (generated
# code) and pydoc_data (its help topics are added as separate documents).
_STDLIB_SKIP_TOP = ("site-packages", "dist-packages", "test", "encodings", "pydoc_data")
_STDLIB_SKIP_ANY = ("tests", "idle_test", "__pycache__")


def _fail(field: str, msg: str, fix: str):
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
  _fail(field, f"cannot read {path} (record {index}): {type(err).__name__}: {err}",
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
    _fail(field, "is empty but source='files'", "set it to a glob of .txt/.jsonl/.json(.gz) "
          "files, e.g. '/data/c4/en/c4-train.*.json.gz'")
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(f))
  if not files:
    _fail(field, f"the glob {pattern!r} matches no file", "check the path and the pattern")
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
      _fail(field, f"{path} is empty", "remove it from the glob or regenerate it")
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
      _fail(field, f"{path} has no record with a 'text' string in its first "
            f"{_PROBE_RECORDS} lines", 'give JSON lines in C4 layout {"text": ...} or .txt files')
  if complete and not selected:
    _fail(field, f"the {len(files)} file(s) hold no non-empty document for this split and "
          "process", "add data, or change config.data.eval_fraction")


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
    _fail("tfds_name", f"cannot open {name!r} split {split!r} as a random-access source "
          f"(tfds_data_dir={data_cfg.tfds_data_dir!r}): {type(e).__name__}: {e}",
          "prepare it in ArrayRecord format (`tfds build c4/en --file_format=array_record "
          "--data_dir=DIR`), set config.data.tfds_data_dir=DIR, or use source='files'")
  if n == 0:
    _fail("tfds_name", f"{name!r} split {split!r} is empty", "check the split name")
  return _TfdsTexts(source)


# ----------------------------------------------------------------------------------------------
# Example layouts (pure NumPy).


def encode_document(text: str, tokenizer, add_eos: bool) -> np.ndarray:
  """Token ids [T] int32 of one document, EOS appended when asked; no BOS."""
  ids = tokenizer.encode(text)
  if add_eos and ids:
    ids = list(ids) + [tokenizer.eos_id]
  return np.asarray(ids, np.int32)


def shift_document(ids_T: np.ndarray) -> dict[str, np.ndarray]:
  """Next-token pair of one document: inputs ids[:-1] [T-1], targets ids[1:] [T-1]."""
  return {"inputs": ids_T[:-1], "targets": ids_T[1:]}


def anchor_example(ids_T: np.ndarray, seq_len: int, pad_id: int,
                   eos_id: int | None) -> dict[str, np.ndarray]:
  """The anchors' layout [seq_len]: first seq_len-1 tokens + EOS (or seq_len tokens without
  EOS), padded; loss on every real next token. `ids_T` carries no EOS yet."""
  ids = ids_T[:seq_len - 1] if eos_id is not None else ids_T[:seq_len]
  if eos_id is not None:
    ids = np.append(ids, np.int32(eos_id))
  n = len(ids)
  idx_L = np.arange(seq_len)
  inputs_L = np.full(seq_len, pad_id, np.int32)
  inputs_L[:n] = ids
  targets_L = np.full(seq_len, pad_id, np.int32)
  targets_L[:n - 1] = ids[1:]
  return {
      "inputs": inputs_L,
      "targets": targets_L,
      "positions": np.where(idx_L < n, idx_L, 0).astype(np.int32),
      "segment_ids": (idx_L < n).astype(np.int32),
      "weights": (idx_L < n - 1).astype(np.float32),
  }


def _finish_packed(pad_id: int, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seg_L = ex["inputs_segment_ids"].astype(np.int32)
  real_L = seg_L > 0
  return {
      "inputs": np.where(real_L, ex["inputs"], pad_id).astype(np.int32),
      "targets": np.where(real_L, ex["targets"], pad_id).astype(np.int32),
      "positions": ex["inputs_positions"].astype(np.int32),
      "segment_ids": seg_L,
      "weights": real_L.astype(np.float32),
  }


class _JsonSafeState(grain.IterDataset):
  """Passes elements through; restores tuples in a ConcatThenSplit state read back from JSON.

  grain 0.2.18 marks "no partial document" with the tuple (-1, -1) and compares with `!=`;
  JSON (how checkpoints store iterator states) returns a list, which would restore a
  phantom remainder.
  """

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeStateIterator(self._parent.__iter__())


class _JsonSafeStateIterator(grain.DatasetIterator):
  """Iterator of `_JsonSafeState`."""

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(state)


def pack(ds: grain.IterDataset, seq_len: int, pad_id: int) -> grain.IterDataset:
  """Concatenate-then-split packing of shifted documents ({inputs, targets} [T-1]) into
  examples of [seq_len]. Targets were shifted inside each document, so none crosses a
  document boundary; a document cut at a row end continues in the next row as a new segment."""
  packed = _JsonSafeState(grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len}))
  return packed.map(functools.partial(_finish_packed, pad_id))


def _to_shifted(tokenizer, add_eos: bool, text: str):
  ids = encode_document(text, tokenizer, add_eos)
  return shift_document(ids) if len(ids) >= 2 else None


def _to_anchor(tokenizer, seq_len: int, add_eos: bool, text: str):
  ids = encode_document(text, tokenizer, add_eos=False)
  if not len(ids):
    return None
  return anchor_example(ids, seq_len, tokenizer.pad_id, tokenizer.eos_id if add_eos else None)


def _not_none(x) -> bool:
  return x is not None


def _layout(ds, data_cfg, tokenizer) -> grain.IterDataset:
  """Texts -> examples of [seq_len] in the configured layout."""
  if data_cfg.packing:
    ds = ds.map(functools.partial(_to_shifted, tokenizer, data_cfg.add_eos)).filter(_not_none)
    return pack(ds, data_cfg.seq_len, tokenizer.pad_id)
  return ds.map(functools.partial(_to_anchor, tokenizer, data_cfg.seq_len,
                                  data_cfg.add_eos)).filter(_not_none)


def padding_example(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """An all-padding row (weights 0) that fills a last partial eval batch."""
  z_L = np.zeros(seq_len, np.int32)
  return {"inputs": z_L + pad_id, "targets": z_L + pad_id, "positions": z_L,
          "segment_ids": z_L, "weights": np.zeros(seq_len, np.float32)}


# ----------------------------------------------------------------------------------------------
# Pipelines.


def _check(data_cfg, tokenizer, batch_size: int, process_index: int, process_count: int):
  if data_cfg.source not in SOURCES:
    _fail("source", f"unknown source {data_cfg.source!r}", f"use one of {SOURCES}")
  if data_cfg.seq_len < 2:
    _fail("seq_len", f"{data_cfg.seq_len} < 2", "use at least 2 tokens per row")
  if not 0.0 <= data_cfg.eval_fraction < 1.0:
    _fail("eval_fraction", f"{data_cfg.eval_fraction} is outside [0, 1)", "use e.g. 0.05")
  if data_cfg.shuffle_window < 1:
    _fail("shuffle_window", f"{data_cfg.shuffle_window} < 1", "use e.g. 1024 (1: no shuffle)")
  if data_cfg.worker_count < 0:
    _fail("worker_count", f"{data_cfg.worker_count} < 0", "use 0 (no worker processes) or more")
  if data_cfg.add_eos and tokenizer.eos_id < 0:
    _fail("add_eos", "the tokenizer has no EOS piece", "set add_eos=False or use a tokenizer "
          "with EOS")
  if batch_size < 1:
    raise ValueError(f"batch_size: {batch_size} < 1; give a positive per-process batch size")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")


def _source_texts(data_cfg, split: str, process_index: int, process_count: int, *,
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
      _fail("eval_fraction", f"the stdlib {split} split is empty at eval_fraction="
            f"{data_cfg.eval_fraction}", "use e.g. 0.05")
    texts = _Texts(ids, read_stdlib_document)
    field = "eval_fraction"
  else:
    texts = _tfds_texts(data_cfg, data_cfg.eval_split if split == "eval"
                        else data_cfg.train_split)
    field = "eval_split" if split == "eval" else "train_split"
  ds = grain.MapDataset.source(texts)[process_index::process_count]
  if not len(ds):
    _fail(field, f"process {process_index} of {process_count} gets no {split} document",
          "use a larger split")
  if seed is not None:
    ds = ds.shuffle(seed).repeat(None)
  return ds.to_iter_dataset()


def _mix_seeds(seed: int, shuffle_seed: int) -> list[int]:
  """Two independent uint32 seeds (documents, rows) from the run seed and the data seed."""
  return [int(s) for s in np.random.SeedSequence([seed, shuffle_seed]).generate_state(2)]


class ProcessRows:
  """Process i's rows [i * n, (i + 1) * n) of a global batch dict of [n * count, ...] arrays."""

  def __init__(self, process_index: int, process_count: int):
    self.index, self.count = process_index, process_count

  def __call__(self, batch: dict) -> dict:
    n = len(next(iter(batch.values()))) // self.count
    return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}


def global_batches(data_cfg) -> bool:
  """True where every process reads the same global batches and keeps its own rows (random
  access sources: the batches do not depend on the process count); file streams shard by file."""
  return data_cfg.source != "files"


def make_train_iterator(data_cfg, tokenizer, batch_size: int, *, seed: int,
                        process_index: int = 0, process_count: int = 1
                        ) -> grain.DatasetIterator:
  """Endless shuffled batches of this process's rows: dict of [batch_size, seq_len] arrays.

  stdlib/tfds: every process builds the same global batch of batch_size * process_count rows
  and keeps rows [i * batch_size, (i + 1) * batch_size), so the batches (and a checkpointed
  iterator) do not depend on the process count. files: each process streams its own files.
  The iterator's `get_state`/`set_state` resume it exactly (save it with
  `grain.checkpoint.CheckpointSave`). Source errors raise ValueError here, before training.
  """
  _check(data_cfg, tokenizer, batch_size, process_index, process_count)
  doc_seed, row_seed = _mix_seeds(seed, data_cfg.shuffle_seed)
  split = (process_index, process_count)
  if global_batches(data_cfg):
    split, batch_size = (0, 1), batch_size * process_count
  texts = _source_texts(data_cfg, "train", *split, seed=doc_seed)
  # Rows are shuffled too: a long document (a stdlib module spans hundreds of rows) would
  # otherwise fill whole batches with consecutive chunks of itself.
  ds = grain.experimental.WindowShuffleIterDataset(
      _layout(texts, data_cfg, tokenizer), window_size=data_cfg.shuffle_window, seed=row_seed)
  ds = ds.batch(batch_size, drop_remainder=True)
  if split != (process_index, process_count):
    ds = ds.map(ProcessRows(process_index, process_count))
  if data_cfg.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  return iter(ds)


def make_eval_batches(data_cfg, tokenizer, batch_size: int, num_batches: int, *,
                      process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The first `num_batches` batches of this process's validation shard, same every call.

  Dicts of [batch_size, seq_len] arrays; a last partial batch is filled with all-padding rows
  (weights 0). With one process the list is shorter when the split runs out; with several,
  all-padding batches make it exactly `num_batches` long so every process runs the same steps.
  """
  _check(data_cfg, tokenizer, batch_size, process_index, process_count)
  if num_batches < 1:
    raise ValueError(f"num_batches: {num_batches} < 1; ask for at least one eval batch")
  if data_cfg.source in ("stdlib", "files") and data_cfg.eval_fraction == 0.0 and not (
      data_cfg.source == "files" and data_cfg.get("eval_files")):
    _fail("eval_fraction", "is 0, so there is no validation split",
          "use e.g. 0.05" + (" or set config.data.eval_files" if data_cfg.source == "files"
                             else ""))
  rows_of = None
  if global_batches(data_cfg) and process_count > 1:   # global batches, this process's rows
    rows_of = ProcessRows(process_index, process_count)
    batch_size, process_index, process_count = batch_size * process_count, 0, 1
  texts = _source_texts(data_cfg, "eval", process_index, process_count, seed=None)
  examples = iter(_layout(texts, data_cfg, tokenizer))
  pad_row = padding_example(data_cfg.seq_len, tokenizer.pad_id)
  batches = []
  while len(batches) < num_batches:
    rows = [row for _, row in zip(range(batch_size), examples)]
    if not rows:
      break
    rows += [pad_row] * (batch_size - len(rows))
    batches.append({k: np.stack([r[k] for r in rows]) for k in KEYS})
  if not batches:
    field = {"stdlib": "eval_fraction", "files": "files", "tfds": "eval_split"}[data_cfg.source]
    _fail(field, "the validation split yields no token", "add validation data")
  if len(batches) < num_batches:
    logging.warning("validation split gives %d of %d batches", len(batches), num_batches)
    if process_count > 1:
      batches += [{k: np.stack([pad_row[k]] * batch_size) for k in KEYS}
                  for _ in range(num_batches - len(batches))]
  return batches if rows_of is None else [rows_of(b) for b in batches]
