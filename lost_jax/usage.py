"""`--help` for every absl command line of the project: the usage on stdout, exit status 0
(absl's own --help exits 1, which a script or CI step reads as a failure)."""

from __future__ import annotations

import sys

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def exit_on_help(argv: list[str]) -> None:
  """Print the usage (every flag for --helpfull) and exit 0 when argv asks for help."""
  asked = [a for a in argv[1:] if a in HELP_FLAGS]
  if asked:
    from absl import app  # pylint: disable=g-import-not-at-top
    app.usage(shorthelp=asked[0] != "--helpfull", writeto_stdout=True)
    sys.exit(0)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (an `app.run` flags_parser), with `exit_on_help` first."""
  exit_on_help(argv)
  from absl import app  # pylint: disable=g-import-not-at-top
  return app.parse_flags_with_usage(argv)
