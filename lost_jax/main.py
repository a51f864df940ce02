"""Command line: `python -m lost_jax.main COMMAND --workdir=... [flags]`.

- pretrain, finetune: `--config=configs/...py:<preset> --workdir=RUN` trains (and resumes).
- calibrate: `--config=configs/finetune.py:<preset> --workdir=DIR [--budget=0.02]` measures
  the base's per-layer sparsity costs on the training data and writes DIR/plan.json, which
  finetune takes as --config.sparse.plan=DIR/plan.json.
- evaluate, generate, export: act on a run's checkpoint (`lost_jax/commands/`).

A mistake in the command line, settings, data, tokenizer or workdir prints one line,
`error: <what>. Fix: <how>`, and exits with status 2 (3: the run diverged); a fault of the
machine (a full disk, a read-only filesystem) is one such line with status 1, Ctrl-C before
the training loop one with status 130. Anything else is a bug and keeps its traceback.
"""

import errno
import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lost_jax import errors, usage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run (config, metrics, "
                               "checkpoints, plots). Re-running resumes from it.")
# evaluate / generate / export
_STEP = flags.DEFINE_integer("step", None, "evaluate, generate, export: the checkpoint step "
                             "to use (default: the newest).")
_BASE = flags.DEFINE_string("base", None, "generate: a base model (HF directory, GGUF file or "
                            "lost_jax pre-training workdir) instead of --workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "generate: a user message (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "generate: a text file, one user "
                                    "message per line, or a JSONL file of {\"prompt\": ...} "
                                    "or {\"messages\": [...]} records.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "generate: new tokens at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy decoding.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass (temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "generate: the sampling seed.")
_OUT = flags.DEFINE_string("out", None, "export: the directory to write.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "peft"], "export: hf (a merged model "
                            "transformers loads) or peft (LoRA adapter files for the HF base).")
_FORWARD = flags.DEFINE_enum("forward", "trained", ["trained", "dense"], "evaluate: the "
                             "forward a fine-tune's loss is computed under: trained (as it "
                             "trained: SparseLoRA's sparse context) or dense (every channel, "
                             "as the model is served).")
_BUDGET = flags.DEFINE_float("budget", 0.02, "calibrate: the loss increase the plan may "
                             "cost, relative to the dense loss (0: the dense plan).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "export: the dtype of the written weights.")

_CONFIG_FIX = ("--config=configs/pretrain.py:<size>,<method> or configs/finetune.py:<preset>, "
               "with --config.<group>.<field>=<value> overrides of fields those files define")


def _exit_with(message: str, code: int = 2):
  """Print the one error line and exit; nothing printed after it reaches the user.

  Background threads (a failed checkpoint restore's abandoned reads) may still print while
  the interpreter shuts down: the error line is the last thing this process has to say, so
  stdout and stderr go to /dev/null for the shutdown.
  """
  errors.clear_progress_bars()
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
    return ("Fix: the flags are --workdir, --config, --config.<group>.<field>=<value> and the "
            "command's own flags (python -m lost_jax.main --helpfull)")
  if message.startswith("flag --config=None"):
    return f"Fix: pass {_CONFIG_FIX}"
  return "Fix: give a value of the field's type (see configs/pretrain.py or configs/finetune.py)"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing and config loading, with every failure as one `error:` line."""
  usage.exit_on_help(argv)
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.to_dict()  # a config file that failed to load raises only when read
  except KeyboardInterrupt:
    _interrupted(argv[1] if len(argv) > 1 else "lost_jax")
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:   # get_config raised: its message names the setting and fix
      reason = _last_line(message)
      _exit_with(reason if "Fix:" in reason else
                 f"{message.split(': ', 1)[0]}: {reason}. Fix: use {_CONFIG_FIX}")
    _exit_with(f"{message.rstrip('.')}. {_flag_error_fix(message)}")
  except (AttributeError, KeyError) as e:   # an override of a setting the config lacks?
    key = _missing_key(e)
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and
           key in a.split("=")[0].split(".")[1:]]
    if bad:
      _exit_with(f"{bad[0]}: the config has no setting {key!r}. Fix: use {_CONFIG_FIX}")
    if key == "to_dict" and not isinstance(_CONFIG.value, ml_collections.ConfigDict):
      _exit_with(f"{_config_arg(argv)}: its get_config() returned "
                 f"{errors.one_line(repr(_CONFIG.value), 60)}, not an ml_collections "
                 f"ConfigDict. Fix: return one, or use {_CONFIG_FIX}")
    if key == "get_config":
      _exit_with(f"{_config_arg(argv)}: the file defines no get_config(). Fix: define "
                 f"get_config() returning an ml_collections ConfigDict, or use {_CONFIG_FIX}")
    _exit_with(f"--config: the config file fails to load ({_where_it_failed(e)}). Fix: correct "
               f"that file, or use {_CONFIG_FIX}")
  except OSError as e:           # the --config file itself cannot be read
    _exit_with(f"{_config_arg(argv)}: cannot load the config file ({_last_line(e)}). Fix: use "
               f"{_CONFIG_FIX}")
  except Exception as e:  # pylint: disable=broad-except
    # Only --config runs user code while flags are parsed: its file failed to load or its
    # get_config raised.
    _exit_with(f"--config: the config file fails to load ({_where_it_failed(e)}). Fix: correct "
               f"that file, or use {_CONFIG_FIX}")
  return rest


def _config_arg(argv: list[str]) -> str:
  """The --config=... argument as given (the flag may not have parsed)."""
  return next((a for a in argv if a.startswith("--config=")), "--config")


def _missing_key(e: Exception) -> str:
  """The name an AttributeError or KeyError says is missing (`'x' object has no attribute
  'k'` -> k, KeyError("'k'") -> k)."""
  m = re.search(r"has no attribute '([^']+)'", str(e))
  return m[1] if m else str(e).strip("'\" ")


def _where_it_failed(e: Exception) -> str:
  """`SomeError: message at file.py line N` for an exception raised by a config file."""
  if isinstance(e, SyntaxError):
    return f"{type(e).__name__}: {e.msg} at {e.filename} line {e.lineno}"
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  place = f" at {tb.tb_frame.f_code.co_filename} line {tb.tb_lineno}" if tb is not None else ""
  return f"{type(e).__name__}: {e}{place}"


TRAIN_COMMANDS = ("pretrain", "finetune", "calibrate")   # take --config (calibrate: finetune's)
RUN_COMMANDS = ("evaluate", "generate", "export")   # act on a finished (or running) run


_PLACEHOLDER = {"config": "configs/pretrain.py:<size>,<method> or configs/finetune.py:<preset>",
                "workdir": "<directory of the run>", "prompt": "<a user message>",
                "out": "<directory to write>"}


def _require(command: str) -> None:
  """One `error:` line for a flag the command needs or cannot take."""
  given = {name for name in ("config", "workdir", "base", "prompt", "prompts_file", "out")
           if flags.FLAGS[name].present}
  need = {"pretrain": [("config",), ("workdir",)], "finetune": [("config",), ("workdir",)],
          "calibrate": [("config",), ("workdir",)],
          "evaluate": [("workdir",)], "generate": [("workdir", "base"), ("prompt", "prompts_file")],
          "export": [("workdir",), ("out",)]}[command]
  for options in need:
    if not given & set(options):
      _exit_with(f"{command} needs --{' or --'.join(options)}. Fix: pass "
                 f"--{options[0]}={_PLACEHOLDER[options[0]]}")
  if command == "generate" and {"workdir", "base"} <= given:
    _exit_with("generate takes --workdir (a run) or --base (a base model), not both. Fix: "
               "drop one of them")


def _train(command: str) -> dict:
  from lost_jax import configs
  from lost_jax.training import xla_setup
  kind = "finetune" if command == "calibrate" else command
  try:   # every setting that can be checked without JAX, before it is even imported
    configs.expand_user_paths(_CONFIG.value)
    configs.validate(_CONFIG.value, kind)
  except errors.UserError as e:
    _exit_with(str(e), e.exit_code)
  xla_setup.configure()   # before the first JAX computation
  errors.cli_output_guard = True
  from lost_jax.training import runtime
  cfg = runtime.resolve_config(_CONFIG.value, kind, validated=True)   # once, then locked
  if command == "calibrate":
    from lost_jax.recipes import calibrate
    record = calibrate.calibrate(cfg, _WORKDIR.value, _BUDGET.value)
    return {"plan": os.path.join(_WORKDIR.value, calibrate.PLAN_FILE),
            "loss_increase": record["increase"], "flops_vs_lora": record["flops_vs_lora"]}
  if command == "pretrain":
    from lost_jax.recipes import pretrain
    return pretrain.train_and_evaluate(cfg, _WORKDIR.value)
  from lost_jax.recipes import finetune
  return finetune.finetune_and_evaluate(cfg, _WORKDIR.value)


def _run_command(command: str) -> dict:
  """evaluate / generate / export: each module's `main(flags)` checks its own inputs first."""
  import importlib  # pylint: disable=g-import-not-at-top
  from lost_jax.training import xla_setup
  xla_setup.configure()
  errors.cli_output_guard = True
  return importlib.import_module(f"lost_jax.commands.{command}").main(flags.FLAGS)


def main(argv):
  # Orbax and grain log every save at INFO; the run's own progress goes to stdout.
  logging.set_verbosity(logging.WARNING)
  commands = TRAIN_COMMANDS + RUN_COMMANDS
  if len(argv) != 2 or argv[1] not in commands:
    _exit_with(f"command {' '.join(argv[1:])!r} is unknown. Fix: "
               f"lost-jax {{{'|'.join(commands)}}} --workdir=... (see --help)")
  command = argv[1]
  _require(command)
  for name in ("workdir", "out", "base", "prompts_file"):   # the shell leaves `--x=~/...`
    if flags.FLAGS[name].value:
      flags.FLAGS[name].value = os.path.expanduser(flags.FLAGS[name].value)
  try:
    result = _train(command) if command in TRAIN_COMMANDS else _run_command(command)
  except errors.UserError as e:
    _exit_with(str(e), e.exit_code)
  except KeyboardInterrupt:   # the training loop itself saves and exits 0 on Ctrl-C
    _interrupted(command)
  except Exception as e:  # pylint: disable=broad-except
    fault = _environment_fault(e)
    if fault is None:
      raise   # a bug: its traceback
    _exit_at_once(*fault)
  summary = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in (result or {}).items())
  print(f"done: {summary}", flush=True)


def _exit_at_once(line: str, code: int):
  """The one error line, then the end of the process without Python's shutdown: checkpoint
  and compile threads still running would otherwise print, block the exit or crash it."""
  logging.flush()
  errors.exit_now(line, code)


def _interrupted(command: str):
  if command in RUN_COMMANDS:   # each writes its result whole at its end, or nothing
    _exit_at_once(f"{command} interrupted (Ctrl-C); nothing was written. Fix: re-run the "
                  "command", 130)
  runtime = sys.modules.get("lost_jax.training.runtime")
  if runtime is not None and runtime.StopFlag.began:
    _exit_at_once(f"{command} interrupted (Ctrl-C) after training began; the checkpoints "
                  "saved so far are kept. Fix: re-run the command (it resumes from the last "
                  "one)", 130)
  _exit_at_once(f"{command} interrupted (Ctrl-C) before training began; no checkpoint was "
                "written or changed. Fix: re-run the command", 130)


_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
         errno.EROFS: "Read-only file system"}


def _environment_fault(e: BaseException) -> tuple[str, int] | None:
  """(line, exit status) for a fault of the machine rather than of lost_jax, None for anything
  else: a full disk, a quota or a read-only filesystem met while writing (an OSError, or the
  message of a checkpoint writer's error; status 1), or a JAX_PLATFORMS that names no usable
  platform (a setting: status 2)."""
  chain, seen = [], e
  while seen is not None and len(chain) < 16:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for err in chain:
    if isinstance(err, OSError) and err.errno in _FULL:
      return _disk_line(err.filename, err.strerror or _FULL[err.errno]), 1
    text = str(err)
    for reason in _FULL.values():
      if reason in text:
        m = re.search(r'(?:local file|Failed writing:?|file) "([^"]+)"', text)
        return _disk_line(m[1] if m else None, reason), 1
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and any(_from_backend_start(err) for err in chain):
    reason = _last_line(e) if "Unable to initialize backend" in str(e) else (
        "JAX started no backend from that list (a platform's plugin is missing or finds no "
        "device)")
    return (f"JAX_PLATFORMS={platforms!r}: {reason}. Fix: unset JAX_PLATFORMS (JAX picks "
            "what the machine has) or name a platform this machine has, e.g. cpu, cuda or "
            "tpu"), 2
  return None


def _from_backend_start(e: BaseException) -> bool:
  """Whether `e` is JAX failing to start its backends (an error raised in xla_bridge)."""
  if "Unable to initialize backend" in str(e):
    return True
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_code.co_filename.endswith("xla_bridge.py")


def _disk_line(path: str | None, reason: str) -> str:
  m = re.search(r"^(.*/checkpoints)/(\d+)\.orbax-checkpoint-tmp", path or "")
  where = f"checkpoint step {m[2]} in {m[1]}" if m else (path or "a file")
  return (f"cannot write {where} ({reason}). Fix: free space (or use a writable filesystem) "
          "and re-run the same command: it resumes from the last finished checkpoint, which "
          "is kept")


def _quiet_orbax(record) -> bool:
  """False for Orbax's own log records on the command line: a failed background save logs
  its error from several threads, then raises it in the main thread, which reports it once."""
  return "/orbax/" not in record.pathname


def run():
  """Console-script entry point (`lost-jax`)."""
  errors.catch_sigint()   # a Ctrl-C nothing may swallow
  logging.get_absl_handler().addFilter(_quiet_orbax)
  # grain's data workers (data.worker_count > 0) hand batches over in shared memory; the
  # batches still in flight when training ends are unlinked at exit by multiprocessing's
  # resource tracker, which would print a warning after `done:` about each such "leak". The
  # tracker takes its warning filters from this list when it starts.
  sys.warnoptions.append("ignore:resource_tracker:UserWarning")
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
