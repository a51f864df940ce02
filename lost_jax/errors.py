"""The exception type of mistakes a user can fix: bad settings, data, tokenizer, workdir.

`lost_jax.main` prints a `UserError` as one line, `error: <message>`, and exits with its
`exit_code` (2); anything else keeps its traceback. It subclasses ValueError so library callers
catching ValueError keep working.
"""

from __future__ import annotations

import os
import signal
import sys


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


# Output guard for the command line (set by lost_jax.main only; library callers never muted).
# A failed checkpoint restore leaves tensorstore reads running on background threads, which
# print tracebacks ('Event loop is closed') from native code, past any Python hook, whenever
# they finish. The CLI mutes the process's stdout/stderr descriptors from the first failed
# restore until one succeeds; if none does, the one error line goes to the saved stderr.
cli_output_guard = False
_saved_fds: tuple[int, int] | None = None


def mute_output() -> None:
  """Point file descriptors 1 and 2 at /dev/null (CLI only; idempotent)."""
  global _saved_fds
  if not cli_output_guard or _saved_fds is not None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  _saved_fds = (os.dup(1), os.dup(2))
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.close(devnull)


def unmute_output() -> None:
  """Give descriptors 1 and 2 back their targets from before `mute_output`."""
  global _saved_fds
  if _saved_fds is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  for fd, saved in zip((1, 2), _saved_fds):
    os.dup2(saved, fd)
    os.close(saved)
  _saved_fds = None


def stderr_fd() -> int:
  """Where a user-facing error line goes: the real stderr, even while output is muted."""
  return 2 if _saved_fds is None else _saved_fds[1]


def clear_progress_bars() -> None:
  """Erase the progress bars on screen, so that an error line starts a line of its own."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
    try:
      bar.clear()
    except Exception:  # pylint: disable=broad-except  # a bar half torn down: nothing to erase
      pass


def exit_now(message: str, code: int = 2) -> None:
  """Print `error: <message>` and end the process at once, from any thread.

  For a wait that native code would otherwise end with an abort (a peer process that never
  arrives), and for faults that leave threads running (a failed checkpoint write); `os._exit`
  skips Python's shutdown, so nothing prints after the line.
  """
  clear_progress_bars()
  sys.stdout.flush()
  sys.stderr.flush()
  os.write(stderr_fd(), f"error: {one_line(message)}\n".encode())
  os._exit(code)


# Ctrl-C before the training loop takes SIGINT over (lost_jax.main calls `catch_sigint`).
# Python raises KeyboardInterrupt wherever the main thread is, and code that swallows it (a
# garbage-collector callback: "Exception ignored in ...") would let start-up go on as if no
# key was pressed: the flag keeps it, and the training loop refuses to begin once it is set.
interrupted = False


def _on_sigint(signum, frame):  # pylint: disable=unused-argument
  global interrupted
  interrupted = True
  raise KeyboardInterrupt


def catch_sigint() -> None:
  """SIGINT raises KeyboardInterrupt as Python's default does, and is remembered; a swallowed
  one prints no traceback of its own; processes this one starts ignore it (lost_jax's
  __init__), since it stops them itself."""
  previous = sys.unraisablehook

  def unraisable(u):
    if not (interrupted and isinstance(u.exc_value, KeyboardInterrupt)):
      previous(u)

  sys.unraisablehook = unraisable
  signal.signal(signal.SIGINT, _on_sigint)
  os.environ["LOST_JAX_CLI_PID"] = str(os.getpid())   # its child processes ignore SIGINT
