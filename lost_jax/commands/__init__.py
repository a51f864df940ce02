"""Command-line commands that act on a run's checkpoint: evaluate, generate, export.

Each module has `main(flags) -> dict` (the summary `done:` prints); it checks its inputs and
raises `errors.UserError` (one `error:` line, exit status 2) before loading anything large.
"""
