"""Side files written the way checkpoints are: whole or not at all."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: str | bytes, mode: int = 0o644) -> None:
  """Write `data` to `path` through a temporary file in the same directory and a rename.

  A kill or a full disk mid-write leaves the old file (or none), never a torn one; the file
  gets `mode` (tempfile's own is 0600).
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:   # a full disk names the file it hit
      e.filename = path
    raise
