"""Pre-training data: tokenization, example layouts (packed or one document per row) and the
grain pipelines of train and eval batches, over the documents of `lost_jax.data.sources`.

Every example is a dict of [seq_len] arrays (`batch.KEYS`): inputs, targets (the next token),
positions (restart at 0 per document), segment_ids (1.. per document, 0 on padding), weights
(float32, 1 where the target is a real next token of the same document).
"""

from __future__ import annotations

import functools
import signal
import logging
from typing import Any

import grain
import numpy as np

from lost_jax.data.batch import ProcessRows, stack_rows
from lost_jax.data.sources import SOURCES, fail, source_texts


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
    fail("source", f"unknown source {data_cfg.source!r}", f"use one of {SOURCES}")
  if data_cfg.seq_len < 2:
    fail("seq_len", f"{data_cfg.seq_len} < 2", "use at least 2 tokens per row")
  if not 0.0 <= data_cfg.eval_fraction < 1.0:
    fail("eval_fraction", f"{data_cfg.eval_fraction} is outside [0, 1)", "use e.g. 0.05")
  if data_cfg.shuffle_window < 1:
    fail("shuffle_window", f"{data_cfg.shuffle_window} < 1", "use e.g. 1024 (1: no shuffle)")
  if data_cfg.worker_count < 0:
    fail("worker_count", f"{data_cfg.worker_count} < 0", "use 0 (no worker processes) or more")
  if data_cfg.add_eos and tokenizer.eos_id < 0:
    fail("add_eos", "the tokenizer has no EOS piece", "set add_eos=False or use a tokenizer "
         "with EOS")
  if batch_size < 1:
    raise ValueError(f"batch_size: {batch_size} < 1; give a positive per-process batch size")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")


def _mix_seeds(seed: int, shuffle_seed: int) -> list[int]:
  """Two independent uint32 seeds (documents, rows) from the run seed and the data seed."""
  return [int(s) for s in np.random.SeedSequence([seed, shuffle_seed]).generate_state(2)]


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
  texts = source_texts(data_cfg, "train", *split, seed=doc_seed)
  # Rows are shuffled too: a long document (a stdlib module spans hundreds of rows) would
  # otherwise fill whole batches with consecutive chunks of itself.
  ds = grain.experimental.WindowShuffleIterDataset(
      _layout(texts, data_cfg, tokenizer), window_size=data_cfg.shuffle_window, seed=row_seed)
  ds = ds.batch(batch_size, drop_remainder=True)
  if split != (process_index, process_count):
    ds = ds.map(ProcessRows(process_index, process_count))
  if data_cfg.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count),
                        worker_init_fn=_quiet_worker)
  return iter(ds)


def _quiet_worker(worker_index: int, worker_count: int) -> None:  # pylint: disable=unused-argument
  """Data workers leave Ctrl-C to the training process, which stops them itself: the terminal's
  SIGINT reaches the whole process group, and each worker would print its own traceback."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    fail("eval_fraction", "is 0, so there is no validation split",
         "use e.g. 0.05" + (" or set config.data.eval_files" if data_cfg.source == "files"
                             else ""))
  rows_of = None
  if global_batches(data_cfg) and process_count > 1:   # global batches, this process's rows
    rows_of = ProcessRows(process_index, process_count)
    batch_size, process_index, process_count = batch_size * process_count, 0, 1
  texts = source_texts(data_cfg, "eval", process_index, process_count, seed=None)
  examples = iter(_layout(texts, data_cfg, tokenizer))
  pad_row = padding_example(data_cfg.seq_len, tokenizer.pad_id)
  batches = []
  while len(batches) < num_batches:
    rows = [row for _, row in zip(range(batch_size), examples)]
    if not rows:
      break
    rows += [pad_row] * (batch_size - len(rows))
    batches.append(stack_rows(rows))
  if not batches:
    field = {"stdlib": "eval_fraction", "files": "files", "tfds": "eval_split"}[data_cfg.source]
    fail(field, "the validation split yields no token", "add validation data")
  if len(batches) < num_batches:
    logging.warning("validation split gives %d of %d batches", len(batches), num_batches)
    if process_count > 1:
      batches += [stack_rows([pad_row] * batch_size)
                  for _ in range(num_batches - len(batches))]
  return batches if rows_of is None else [rows_of(b) for b in batches]
