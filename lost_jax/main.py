"""Command line: `python -m lost_jax.main pretrain|finetune --config=... --workdir=...`."""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run (config, metrics, "
                               "checkpoints, plots). Re-running resumes from it.")
flags.mark_flags_as_required(["config", "workdir"])

COMMANDS = ("pretrain", "finetune")


def main(argv):
  # Orbax and grain log every save at INFO; the run's own progress goes to stdout.
  logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: lost-jax {{{'|'.join(COMMANDS)}}} --config=... --workdir=...")
  from lost_jax import xla_setup
  xla_setup.configure()   # before the first JAX computation
  if argv[1] == "pretrain":
    from lost_jax import train
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    from lost_jax import finetune
    result = finetune.finetune_and_evaluate(_CONFIG.value, _WORKDIR.value)
  summary = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in result.items())
  print(f"done: {summary}", flush=True)


def run():
  """Console-script entry point (`lost-jax`)."""
  app.run(main)


if __name__ == "__main__":
  run()
