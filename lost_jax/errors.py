"""The exception type of mistakes a user can fix: bad settings, data, tokenizer, workdir.

`lost_jax.main` prints a `UserError` as one line, `error: <message>`, and exits with its
`exit_code` (2); anything else keeps its traceback. It subclasses ValueError so library callers
catching ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake in the run's inputs; the message names the setting and says how to fix it."""
  exit_code = 2


class TrainingDiverged(UserError):
  """Too many consecutive non-finite steps; the message names the last good checkpoint."""
  exit_code = 3


def one_line(text, limit: int | None = None) -> str:
  """`text` squeezed onto one line (whitespace runs become one space), cut at `limit` chars."""
  flat = " ".join(str(text).split())
  return flat if limit is None or len(flat) <= limit else flat[:limit - 3] + "..."
