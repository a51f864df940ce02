"""`python -m lost_jax.main export --workdir=RUN --out=DIR --format=hf|peft [--dtype=bfloat16]
[--step=N]`: a run as a Hugging Face model or PEFT adapter (`lost_jax.recipes.export`)."""

from lost_jax.recipes.export import export_run


def main(flags) -> dict:
  return export_run(flags.workdir, flags.out, format=flags.format, dtype=flags.dtype,
                    step=flags.step)
