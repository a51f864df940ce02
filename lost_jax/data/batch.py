"""The batch every data pipeline yields and the train step reads: its keys, rows stacked into
one, and a process's own rows of a global batch."""

from __future__ import annotations

import numpy as np

# Every example and batch is a dict of these arrays, [seq_len] per row: inputs, targets (the
# next token), positions, segment_ids (0 on padding) and weights (float32 loss weights).
KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def stack_rows(rows: list[dict]) -> dict[str, np.ndarray]:
  """Rows (dicts of [seq_len] arrays) -> one batch, dict of [len(rows), seq_len] arrays."""
  return {k: np.stack([r[k] for r in rows]) for k in KEYS}


class ProcessRows:
  """Process i's rows [i * n, (i + 1) * n) of a global batch dict of [n * count, ...] arrays."""

  def __init__(self, process_index: int, process_count: int):
    self.index, self.count = process_index, process_count

  def __call__(self, batch: dict) -> dict:
    n = len(next(iter(batch.values()))) // self.count
    return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}
