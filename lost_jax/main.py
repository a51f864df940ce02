"""Command line: `python -m lost_jax.main pretrain|finetune --config=... --workdir=...`.

A mistake in the command line, settings, data, tokenizer or workdir prints one line,
`error: <what>. Fix: <how>`, and exits with status 2 (3: the run diverged); anything else is a
bug and keeps its traceback.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lost_jax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run (config, metrics, "
                               "checkpoints, plots). Re-running resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])

_CONFIG_FIX = ("--config=configs/pretrain.py:<size>,<method> or configs/finetune.py:<preset>, "
               "with --config.<group>.<field>=<value> overrides of fields those files define")


def _exit_with(message: str, code: int = 2):
  """Print the one error line and exit; nothing printed after it reaches the user.

  Background threads (a failed checkpoint restore's abandoned reads) may still print while
  the interpreter shuts down: the error line is the last thing this process has to say, so
  stdout and stderr go to /dev/null for the shutdown.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os.write(errors.stderr_fd(), f"error: {errors.one_line(message)}\n".encode())
  errors.cli_output_guard = True
  errors.mute_output()
  sys.exit(code)


def _last_line(text: str) -> str:
  """The last non-blank line of `text`, without a leading `SomeError: ` (a traceback's end)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  last = lines[-1] if lines else ""
  m = re.match(r"^[\w.]+(?:Error|Exception): (.*)$", last)
  return m.group(1) if m else last


def _flag_error_fix(message: str) -> str:
  if "--workdir" in message:
    return "Fix: pass --workdir=<directory of this run>"
  if "Unknown command line flag" in message:
    return "Fix: the flags are --workdir, --config and --config.<group>.<field>=<value>"
  if message.startswith("flag --config=None"):
    return f"Fix: pass {_CONFIG_FIX}"
  return "Fix: give a value of the field's type (see configs/pretrain.py or configs/finetune.py)"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing and config loading, with every failure as one `error:` line."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.to_dict()    # a config file that failed to load raises only when read
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:   # get_config raised: its message names the setting and fix
      reason = _last_line(message)
      _exit_with(reason if "Fix:" in reason else
                 f"{message.split(': ', 1)[0]}: {reason}. Fix: use {_CONFIG_FIX}")
    _exit_with(f"{message.rstrip('.')}. {_flag_error_fix(message)}")
  except AttributeError as e:    # an override of a field the config does not have
    key = str(e).strip("'\"")
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and
           key in a.split("=")[0].split(".")]
    _exit_with(f"{bad[0] if bad else '--config'}: the config has no setting {key!r}. "
               f"Fix: use {_CONFIG_FIX}")
  except OSError as e:           # the --config file itself cannot be read
    _exit_with(f"--config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: cannot load "
               f"the config file ({_last_line(e)}). Fix: use {_CONFIG_FIX}")
  return rest


def main(argv):
  # Orbax and grain log every save at INFO; the run's own progress goes to stdout.
  logging.set_verbosity(logging.WARNING)
  from lost_jax.configs.resolve import COMMANDS
  if len(argv) != 2 or argv[1] not in COMMANDS:
    _exit_with(f"command {' '.join(argv[1:])!r} is unknown. Fix: "
               f"lost-jax {{{'|'.join(COMMANDS)}}} --config=... --workdir=...")
  from lost_jax import configs
  from lost_jax.training import xla_setup
  command = argv[1]
  try:   # every setting that can be checked without JAX, before it is even imported
    configs.validate(_CONFIG.value, command)
  except errors.UserError as e:
    _exit_with(str(e), e.exit_code)
  xla_setup.configure()   # before the first JAX computation
  errors.cli_output_guard = True
  try:
    from lost_jax.training import runtime
    cfg = runtime.resolve_config(_CONFIG.value, command, validated=True)   # once, then locked
    if command == "pretrain":
      from lost_jax.recipes import pretrain
      result = pretrain.train_and_evaluate(cfg, _WORKDIR.value)
    else:
      from lost_jax.recipes import finetune
      result = finetune.finetune_and_evaluate(cfg, _WORKDIR.value)
  except errors.UserError as e:
    _exit_with(str(e), e.exit_code)
  summary = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in result.items())
  print(f"done: {summary}", flush=True)


def run():
  """Console-script entry point (`lost-jax`)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
