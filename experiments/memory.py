"""Ahead-of-time memory of one training step for every size x method (XLA memory_analysis).

A command line over `lost_jax.measure.step_memory`, which compiles the real train step on
abstract inputs for one device: each row has XLA's buffer bytes (arguments, temporaries,
outputs, aliased outputs) beside the closed-form `accounting.memory_estimate`. The pages and
tables are written by `experiments.memory_report`.

  python -m experiments.memory --sizes=llama_1b --methods=full_rank,lost --remat
  python -m experiments.memory --platform=tpu --topology=v5p:2x2x1   # needs libtpu
  # docs/benchmarks/memory_low_bit.md (8-bit states at 1B/7B, 8B SparseLoRA on an NF4 base):
  python -m experiments.memory --low_bit_md=docs/benchmarks/memory_low_bit.md
  # docs/benchmarks/memory_loss.md (plain vs fused LM head + loss, 1B dims, 128256 vocab):
  python -m experiments.memory --loss_md=docs/benchmarks/memory_loss.md
  # docs/benchmarks/memory.md:
  python -m experiments.memory --sweep_sizes=llama_1b,llama_7b \\
      --remat_check_sizes=llama_1b,llama_7b --out_md=docs/benchmarks/memory.md \\
      --out_png=docs/benchmarks/memory.png
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from experiments import common
from experiments import memory_report as report
from lost_jax import configs
from lost_jax.training import accounting
from lost_jax.measure import compiled
from lost_jax.measure import step_memory
from lost_jax.measure.compiled import GIB

FINETUNE_PRESET = "llama3_8b_math"


def run(sizes: Iterable[str], methods: Iterable[str], *, precision: str = "mixed",
        microbatch: int | None = None, remat: bool = False, platform: str = "cpu",
        topology: str = "v5p:2x2x1", overrides: dict[str, Any] | None = None,
        eight_bit: bool = False, log: Callable[[str], None] = print) -> list[dict]:
  """Measure every (size, method); rows carry XLA's bytes, the estimate and x full-rank."""
  devices = compiled.target_devices(platform, topology)
  rows = []
  for size in sizes:
    for method in methods:
      cfg = step_memory.measurement_config(size, method, precision=precision,
                                           microbatch=microbatch, remat=remat,
                                           overrides=overrides, eight_bit=eight_bit)
      # The step as it would run on the target: its attention kernel and matmul backward.
      configs.resolve_perf(cfg.model, platform)
      row = dict(size=size, method=method, optimizer=cfg.train.optimizer,
                 platform=platform, device=str(devices[0].device_kind),
                 perf=dict(cfg.model.perf),
                 precision=precision, remat=bool(cfg.model.remat),
                 microbatch=cfg.train.batch_size // cfg.train.microbatches,
                 microbatches=cfg.train.microbatches, global_batch=cfg.train.batch_size,
                 seq_len=cfg.data.seq_len,
                 params=accounting.count_params(cfg.model)["total"],
                 estimate=accounting.memory_estimate(cfg))
      row.update(step_memory.measure(cfg, devices))
      row["total"] = compiled.device_total(row, platform)
      rows.append(row)
      log(f"{size:>11} {method:>9} | micro-batch {row['microbatch']} x {row['microbatches']} | "
          f"remat {row['remat']} | args {row['argument'] / GIB:7.2f} GiB | temp "
          f"{row['temp'] / GIB:7.2f} GiB | total {row['total'] / GIB:7.2f} GiB | estimate "
          f"{row['estimate']['total'] / GIB:7.2f} GiB | compiled in {row['compile_s']:.0f} s")
  add_ratios(rows)
  return rows


def add_ratios(rows: list[dict]) -> None:
  """x full-rank of the measured and estimated totals, within each size (needs full_rank)."""
  base = {r["size"]: r for r in rows if r["method"] == "full_rank"}
  for r in rows:
    b = base.get(r["size"])
    r["ratio"] = r["total"] / b["total"] if b else float("nan")
    r["estimate_ratio"] = (r["estimate"]["total"] / b["estimate"]["total"]
                           if b else float("nan"))


def sweep(sizes: Iterable[str], microbatches: Iterable[int], *,
          methods: Iterable[str] = ("full_rank", "lost"), known: Iterable[dict] = (),
          **kwargs) -> list[dict]:
  """`run` at every micro-batch size; rows already in `known` with the same setting are reused."""
  known = list(known)
  out = []
  for size in sizes:
    for micro in microbatches:
      have = {r["method"]: r for r in known if r["size"] == size and r["microbatch"] == micro}
      todo = [m for m in methods if m not in have]
      new = run([size], todo, microbatch=micro, **kwargs) if todo else []
      rows = [have.get(m) or next(r for r in new if r["method"] == m) for m in methods]
      add_ratios(rows)
      out.extend(dict(r) for r in rows)
  return out


def loss_rows(size: str, methods: Iterable[str], chunks: Iterable[int], *, vocab: int,
              batch: int, seq_len: int, **kwargs) -> list[dict]:
  """`run` of one micro-batch of batch x seq_len tokens at `vocab` for each
  model.perf.loss_chunk (0: plain loss on whole float32 logits)."""
  rows, base = [], kwargs.pop("overrides", None) or {}
  for chunk in chunks:
    over = {**base, "model.vocab_size": vocab, "data.seq_len": seq_len,
            "train.batch_size": batch, "model.perf.loss_chunk": int(chunk)}
    for r in run([size], methods, microbatch=batch, overrides=over, **kwargs):
      r.update(loss_chunk=int(chunk), vocab=vocab)
      rows.append(r)
  return rows


def _main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  common.code_version_line()   # the code this run starts on
  if f.platform == "tpu":
    compiled.deviceless_tpu_env()
  kwargs = dict(precision=f.precision, platform=f.platform, topology=f.topology,
                overrides={"model.perf.layer_loop": f.layer_loop})
  micro = f.microbatch or None
  if f.low_bit_md:    # only the 8-bit-state / 4-bit-base page
    rows32 = run(f.low_bit_sizes, ["full_rank", "lost"], microbatch=micro, remat=f.remat,
                 **kwargs)
    rows8 = run(f.low_bit_sizes, ["full_rank", "lost"], microbatch=micro, remat=f.remat,
                eight_bit=True, **kwargs)
    ft_rows = []
    for quantize in ("none", "nf4") if f.finetune_preset else ():
      cfg = step_memory.finetune_memory_config(f.finetune_preset, quantize)
      devices = compiled.target_devices(f.platform, f.topology)
      ft_rows.append(step_memory.measure_finetune(cfg, devices))
      print(f"fine-tune {f.finetune_preset} base {quantize}: total "
            f"{report.gib(ft_rows[-1]['sum'])} GiB")
    if rows8:
      print(report.low_bit_table(rows32, rows8))
    if ft_rows:
      print(report.finetune_table(ft_rows))
    print("\n".join(report.low_bit_lines(rows32, rows8, ft_rows)))
    report.write_low_bit_markdown(f.low_bit_md, common.command_line(), rows32, rows8, ft_rows)
    return
  if f.loss_md:    # only the plain-vs-fused loss page
    rows = loss_rows(f.loss_size, f.loss_methods, [int(c) for c in f.loss_chunks],
                     vocab=f.loss_vocab, batch=f.loss_batch, seq_len=f.loss_seq_len,
                     remat=f.remat, **kwargs)
    print(report.loss_table(rows))
    report.write_loss_markdown(f.loss_md, common.command_line(), rows)
    return
  rows = run(f.sizes, f.methods, microbatch=micro, remat=f.remat, **kwargs)
  print(report.markdown_table(rows))
  swept, remat_rows = [], []
  if f.sweep_sizes:
    swept = sweep(f.sweep_sizes, [int(m) for m in f.sweep_microbatches], known=rows,
                  remat=f.remat, **kwargs)
    print(report.sweep_table(swept))
    print("\n".join(report.fit_lines(swept)))
  if f.remat_check_sizes:
    remat_rows = run(f.remat_check_sizes, ["full_rank", "lost"], microbatch=micro,
                     remat=not f.remat, **kwargs)
    print(report.remat_table(rows + remat_rows))
  loop_rows = []
  if f.loop_check_sizes:
    other = {r["perf"]["layer_loop"] for r in rows} ^ set(configs.LAYER_LOOPS)
    loop_rows = run(f.loop_check_sizes, ["full_rank", "lost"], microbatch=micro,
                    remat=f.remat, **{**kwargs, "overrides": {
                        "model.perf.layer_loop": other.pop()}})
    print(report.loop_table(rows + loop_rows))
  print("\n".join(report.summary_lines(rows)
                  + report.target_lines(rows, swept, remat_rows=remat_rows)))
  if f.out_md:
    command = common.command_line()
    image = os.path.relpath(f.out_png, os.path.dirname(f.out_md) or ".") if f.out_png else ""
    report.write_markdown(rows, f.out_md, command, swept, remat_rows, image, loop_rows)
  if f.out_png:
    report.plot(rows, f.out_png, title=report.settings_line(rows))


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("sizes", list(configs.SIZES[1:]), "Model sizes (configs.SIZES).")
  flags.DEFINE_list("methods", list(configs.METHODS), "Methods (configs.METHODS).")
  flags.DEFINE_enum("precision", "mixed", list(configs.PRECISIONS), "train.precision.")
  flags.DEFINE_integer("microbatch", 0, "Sequences per device per pass; 0: DEFAULT_MICROBATCH "
                       "per size (32 up to 350M, 8 at 1B, 4 at 7B).")
  flags.DEFINE_bool("remat", False, "model.remat: recompute each block in the backward pass.")
  flags.DEFINE_list("loop_check_sizes", [], "Also measure full_rank and lost at these sizes "
                    "with the other model.perf.layer_loop (memory and compile time).")
  flags.DEFINE_enum("layer_loop", "auto", ("auto",) + configs.LAYER_LOOPS, "model.perf."
                    "layer_loop of every compiled step (auto: resolved for --platform).")
  flags.DEFINE_enum("platform", "cpu", list(compiled.PLATFORMS), "Compile for the host CPU, or "
                    "deviceless for one TPU chip (needs the libtpu package).")
  flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology to compile for (--platform=tpu); "
                      "one chip of it is used (a v5p chip has about 95 GB of HBM).")
  flags.DEFINE_list("sweep_sizes", [], "Also measure full_rank and lost at these sizes for "
                    "every --sweep_microbatches (micro-batch sensitivity).")
  flags.DEFINE_list("sweep_microbatches", ["1", "2", "4", "8", "16"], "Micro-batch sizes of "
                    "the sweep.")
  flags.DEFINE_list("remat_check_sizes", [], "Also measure full_rank and lost at these sizes "
                    "with the opposite --remat setting.")
  flags.DEFINE_string("low_bit_md", "", "Instead of the main tables: measure full_rank and "
                      "lost at --low_bit_sizes with 32-bit and 8-bit optimizer states and the "
                      "--finetune_preset SparseLoRA step with a bf16 and an NF4 base; write "
                      "this markdown page.")
  flags.DEFINE_list("low_bit_sizes", ["llama_1b", "llama_7b"], "Sizes of the 8-bit-state rows "
                    "of --low_bit_md ('' for none).")
  flags.DEFINE_string("finetune_preset", FINETUNE_PRESET, "Fine-tuning preset whose shape the "
                      "4-bit-base rows of --low_bit_md compile ('' for none).")
  flags.DEFINE_string("loss_md", "", "Instead of the main tables: compile --loss_size x "
                      "--loss_methods with each --loss_chunks (0: plain loss) on one "
                      "micro-batch of --loss_batch x --loss_seq_len tokens at --loss_vocab; "
                      "write this markdown page.")
  flags.DEFINE_string("loss_size", "llama_1b", "Size of the --loss_md rows.")
  flags.DEFINE_list("loss_methods", ["full_rank", "lost"], "Methods of the --loss_md rows.")
  flags.DEFINE_list("loss_chunks", ["0", str(configs.LOSS_CHUNK)], "model.perf.loss_chunk "
                    "values of the --loss_md rows (0: plain loss).")
  flags.DEFINE_integer("loss_vocab", 128256, "Vocab of the --loss_md rows (LLaMA-3's).")
  flags.DEFINE_integer("loss_batch", 8, "Sequences per step of the --loss_md rows.")
  flags.DEFINE_integer("loss_seq_len", 1024, "Tokens per sequence of the --loss_md rows.")
  flags.DEFINE_string("out_md", "", "Write the markdown report here ('' = print only).")
  flags.DEFINE_string("out_png", "", "Write the stacked bar plot here ('' = none).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(_main, flags_parser=common.parse_flags)
