"""The pages experiments/memory.py writes: tables, plots and notes of compiled step memory.

Rows come from `experiments.memory.run` (one per size x method, XLA's bytes from
`lost_jax.measure.step_memory`); everything here only formats them.
"""

from __future__ import annotations

import collections
import math
import os

import jax
import numpy as np

from experiments import common
from lost_jax.measure.compiled import GIB

TARGET = 0.55    # the bound on LOST's total / full-rank's total at 1B and 7B.


def gib(x: float) -> str:
  """Bytes as GiB with two decimals."""
  return f"{x / GIB:.2f}"


def total_label(platform: str) -> str:
  """What the total column is on this platform (see compiled.device_total)."""
  return ("compiler peak" if platform == "tpu" else "arguments + temp + output - alias")


def columns_line(platform: str) -> str:
  """What each memory column of markdown_table is, on this platform."""
  total = ("the TPU compiler's peak (`peak_memory_in_bytes`, its heap simulation: buffers "
           "with disjoint lifetimes share memory, so it can be below the sum of the three "
           "columns before it)" if platform == "tpu" else
           "arguments + temp + output - alias (XLA:CPU reports no peak with temporaries)")
  return ("Columns: **arguments** = parameters + optimizer state + static indices + batch; "
          "**temp** = XLA's temporaries (gradients, accumulator, activations, workspace); "
          "**output - alias** = outputs not written into donated arguments; **total** = "
          f"{total}; **estimate** = `accounting.memory_estimate` (closed form).")


def markdown_table(rows: list[dict]) -> str:
  """One markdown row per measurement; memory in GiB."""
  head = ("| size | method | params (M) | micro-batch x passes | remat | arguments | temp | "
          f"output - alias | **total = {total_label(rows[0]['platform'])}** | "
          "**x full-rank** | estimate total | estimate x full-rank | estimate (W / G / O / A) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    e = r["estimate"]
    lines.append(
        f"| {r['size']} | {r['method']} | {r['params'] / 1e6:.1f} | "
        f"{r['microbatch']} x {r['microbatches']} | {'yes' if r['remat'] else 'no'} | "
        f"{gib(r['argument'])} | {gib(r['temp'])} | {gib(r['output'] - r['alias'])} | "
        f"**{gib(r['total'])}** | **{r['ratio']:.2f}** | {gib(e['total'])} | "
        f"{r['estimate_ratio']:.2f} | {gib(e['weights'])} / {gib(e['gradients'])} / "
        f"{gib(e['optimizer'])} / {gib(e['activations'])} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "") -> None:
  """Stacked bars per method (arguments, then everything else) in one panel per size."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sizes = list(dict.fromkeys(r["size"] for r in rows))
  fig, axes = plt.subplots(1, len(sizes), figsize=(max(3.2 * len(sizes) + 1, 9), 4),
                           squeeze=False)
  for ax, size in zip(axes[0], sizes):
    sub = [r for r in rows if r["size"] == size]
    x = np.arange(len(sub))
    args = np.array([r["argument"] for r in sub]) / GIB
    rest = np.array([r["total"] for r in sub]) / GIB - args
    ax.bar(x, args, color="#4C72B0", label="arguments: weights + optimizer state")
    ax.bar(x, rest, bottom=args, color="#DD8452",
           label="temporaries: gradients + activations + workspace")
    ax.scatter(x, [r["estimate"]["total"] / GIB for r in sub], marker="_", s=300, c="k",
               zorder=3, label="accounting estimate")
    ax.set_xticks(x, [r["method"] for r in sub], rotation=45, ha="right")
    ax.set_title(size)
    ax.set_ylabel("GiB per device" if ax is axes[0][0] else "")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper center", ncol=3, frameon=False)
  if title:
    fig.suptitle(title, y=0.02, fontsize=8)
  fig.tight_layout(rect=(0, 0.04, 1, 0.9))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary_lines(rows: list[dict]) -> list[str]:
  """Per size: LOST's total and arguments (weights + optimizer state) as a multiple of full-rank."""
  out = []
  for r in rows:
    if r["method"] != "lost" or math.isnan(r["ratio"]):
      continue
    full = next(b for b in rows if b["size"] == r["size"] and b["method"] == "full_rank")
    out.append(f"{r['size']}: LOST total = {r['ratio']:.2f} x full-rank ({gib(r['total'])} vs "
               f"{gib(full['total'])} GiB; accounting estimate {r['estimate_ratio']:.2f} x); "
               f"arguments alone {r['argument'] / full['argument']:.2f} x")
  return out


def per_sequence_fit(rows: list[dict], size: str, method: str) -> tuple[float, float] | None:
  """Least-squares (bytes at 0 sequences, bytes per sequence) of temp vs micro-batch."""
  pts = [(r["microbatch"], r["temp"]) for r in rows if r["size"] == size and r["method"] == method]
  if len(pts) < 2:
    return None
  x, y = np.array(pts, dtype=np.float64).T
  slope, intercept = np.polyfit(x, y, 1)
  return float(intercept), float(slope)


def sweep_table(rows: list[dict]) -> str:
  """LOST vs full-rank totals per micro-batch size."""
  lines = ["| size | micro-batch x passes | full-rank total | LOST total | **LOST x full-rank** | "
           "estimate x full-rank |", "|---|---|---|---|---|---|"]
  for r in rows:
    if r["method"] != "lost":
      continue
    full = r["total"] / r["ratio"]
    lines.append(f"| {r['size']} | {r['microbatch']} x {r['microbatches']} | {gib(full)} | "
                 f"{gib(r['total'])} | **{r['ratio']:.2f}** | {r['estimate_ratio']:.2f} |")
  return "\n".join(lines)


def fit_lines(rows: list[dict]) -> list[str]:
  """What the temporaries are made of: a batch-independent part and a per-sequence part."""
  out = []
  for size in dict.fromkeys(r["size"] for r in rows):
    for method in dict.fromkeys(r["method"] for r in rows if r["size"] == size):
      fit = per_sequence_fit(rows, size, method)
      if fit is None:
        continue
      r = next(r for r in rows if r["size"] == size and r["method"] == method)
      est_per_seq = r["estimate"]["activations"] / r["microbatch"]
      out.append(f"{size} {method}: temp = {gib(fit[0])} GiB + {fit[1] / GIB:.3f} GiB per "
                 f"sequence of the micro-batch (batch-independent part = "
                 f"{fit[0] / r['params_bytes']:.1f} x the float32 weights; the accounting's "
                 f"activations: {est_per_seq / GIB:.3f} GiB per sequence)")
  return out


def remat_table(rows: list[dict]) -> str:
  """Temporaries and totals without and with model.remat, measured and estimated."""
  key = lambda r: (r["size"], r["method"], r["microbatch"])
  on = {key(r): r for r in rows if r["remat"]}
  off = list({key(r): r for r in rows if not r["remat"] and key(r) in on}.values())
  lines = ["| size | method | micro-batch | temp, no remat | temp, remat | total, no remat | "
           "total, remat | estimate activations, no remat | estimate activations, remat |",
           "|---|---|---|---|---|---|---|---|---|"]
  for a in off:
    b = on[key(a)]
    lines.append(f"| {a['size']} | {a['method']} | {a['microbatch']} | {gib(a['temp'])} | "
                 f"{gib(b['temp'])} | {gib(a['total'])} | {gib(b['total'])} | "
                 f"{gib(a['estimate']['activations'])} | {gib(b['estimate']['activations'])} |")
  return "\n".join(lines)


def loop_table(rows: list[dict]) -> str:
  """The same step with model.perf.layer_loop unrolled and scan: memory and compile time."""
  key = lambda r: (r["size"], r["method"], r["microbatch"], r["remat"])
  by_loop = collections.defaultdict(dict)
  for r in rows:
    by_loop[key(r)][r["perf"]["layer_loop"]] = r
  lines = ["| size | method | micro-batch | remat | layer loop | arguments | temp | **total** | "
           "total x unrolled | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for k, loops in by_loop.items():
    if set(loops) != {"unrolled", "scan"}:
      continue
    for loop in ("unrolled", "scan"):
      r = loops[loop]
      lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {'yes' if k[3] else 'no'} | {loop} | "
                   f"{gib(r['argument'])} | {gib(r['temp'])} | **{gib(r['total'])}** | "
                   f"{r['total'] / loops['unrolled']['total']:.2f} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def dot_line(row: dict) -> str:
  """How the compiler changed matmul dtypes in one measured step."""
  fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none left as dot"
  return (f"{row['size']} {row['method']} on {row['platform']}: dot instructions by result "
          f"dtype before optimisation: {fmt(row['dots_before'])}; after: "
          f"{fmt(row['dots_after'])}")


def target_lines(rows: list[dict], swept: list[dict], target: float = TARGET,
                 remat_rows: list[dict] = ()) -> list[str]:
  """Is LOST's total <= target x full-rank at 1B and 7B: by micro-batch size, and with the
  opposite `model.remat` setting where `remat_rows` measured it?"""
  out = []
  for size in ("llama_1b", "llama_7b"):
    main = next((r for r in rows if r["size"] == size and r["method"] == "lost"), None)
    if main is None or math.isnan(main["ratio"]):
      continue
    verdict = "met" if main["ratio"] <= target else "not met"
    line = (f"{size}: target LOST <= {target} x full-rank {verdict} at the default micro-batch "
            f"{main['microbatch']} ({main['ratio']:.2f} x)")
    pts = sorted({r["microbatch"]: r["ratio"] for r in [main] + swept
                  if r["size"] == size and r["method"] == "lost"}.items())
    if len(pts) > 1:
      ok = [m for m, ratio in pts if ratio <= target]
      line += ("; by micro-batch " + ", ".join(f"{m}: {ratio:.2f}" for m, ratio in pts)
               + (f" -> met up to micro-batch {max(ok)} of those measured" if ok
                  else " -> met at none"))
    other = next((r for r in remat_rows if r["size"] == size and r["method"] == "lost"
                  and r["microbatch"] == main["microbatch"]), None)
    if other is not None and not math.isnan(other["ratio"]):
      line += (f"; {'with' if other['remat'] else 'without'} model.remat at micro-batch "
               f"{other['microbatch']}: {other['ratio']:.2f} x -> "
               + ("met" if other["ratio"] <= target else "not met"))
    out.append(line)
  return out


NOTES = """## How the numbers are made

- **What is compiled**: the real `lost_jax.train.make_train_step` (jit, state donated): a
  `lax.scan` over micro-batches that accumulates float32 gradients, then global-norm clipping
  and the AdamW update (GaLore on block kernels for `galore`). Inputs are `jax.ShapeDtypeStruct`s
  carrying the step's shardings, so nothing is allocated; one device holds the whole model.
- **Batch**: the paper's global batch of 512 sequences x 256 tokens is one argument of the step
  and is consumed in micro-batches (`micro-batch x passes`); only one micro-batch's
  activations are alive at a time. The micro-batch is a free choice (`--microbatch`): the
  defaults (32 sequences up to 350M, 8 at 1B, 4 at 7B) are ours, not published numbers.
- **arguments** = float32 weights + optimizer state + int32 static indices + the batch (the test
  checks this to the byte against the abstract inputs). **temp** = everything else the step
  allocates: the float32 gradient accumulator, one micro-batch's gradients, the activations
  saved for the backward pass, and the optimizer's workspace. **total** = arguments + temp +
  output - alias (donated outputs reuse their inputs). XLA:CPU's own `peak_memory_in_bytes`
  equals arguments + output - alias in this jax version (temporaries left out), so it is not
  used on CPU; with `--platform=tpu` the total is the TPU compiler's peak (its heap
  simulation, `memory_analysis().peak_memory_in_bytes`), which can be below arguments + temp
  + output - alias because buffers with disjoint lifetimes share memory.
- **model.perf**: the step is traced with the performance settings resolved for the target
  platform (`configs.resolve_perf`): on TPU the plain XLA matmul backward and jax's Pallas
  splash-attention kernel (compiled by the TPU compiler), on CPU the transposed backward and
  blocked attention; the layer loop is `--layer_loop` (auto: unrolled).
- **estimate** = `lost_jax.accounting.memory_estimate`: weights (W) + one set of gradients (G)
  + optimizer states (O) + activations of one micro-batch (A, bf16 with float32 softmax and
  logits). It is the paper's accounting; it has no accumulation buffer and no workspace.

## Caveats of compiling for the CPU

- XLA:CPU computes matmuls in float32: the dot counts below show every bf16 dot of the
  traced step rewritten to f32. Activations saved around those dots are then float32, so the
  per-sequence part of `temp` is about twice what a bf16 accelerator keeps (see the fitted
  per-sequence bytes against the accounting's).
- XLA:CPU realises no saving from rematerialisation (the remat table): judge `model.remat` by
  the accounting estimate, or compile for an accelerator (`--platform=tpu`, deviceless, needs
  `pip install 'libtpu==0.0.42.*'`, jax[tpu]'s pin for jax 0.10.2; the TPU compiler also
  rematerialises on its own when a step exceeds the chip's HBM, so pick a topology with
  enough HBM, e.g. `--topology=v5p:2x2x1` with about 95 GB per chip).
- The batch-independent part of `temp` (the fit's intercept) is gradient-sized buffers: the
  float32 accumulator, the current micro-batch's gradients and optimizer workspace. The paper
  counts one set of gradients.
- `--platform=tpu` compiles the same step for one TPU chip without having one (the TPU
  compiler fuses matmuls, so no `dot` is left to count after optimisation);
  `docs/benchmarks/memory_tpu.md` is such a run at 1B, its command inside. There LOST/full-rank
  follows the accounting estimate closely and `model.remat` does cut the temporaries.
"""


def write_markdown(rows: list[dict], path: str, command: str, swept: list[dict] | None = None,
                   remat_rows: list[dict] | None = None, image: str = "",
                   loop_rows: list[dict] | None = None) -> None:
  """The measured tables, how they were made (command, jax version, device) and notes."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  swept = swept or []
  parts = ["# Training-step memory, compiled ahead of time\n",
           common.page_head(command), settings_line(rows) + ". Memory in GiB per device.\n",
           f"![memory per method]({image})\n" if image else "",
           markdown_table(rows) + "\n", columns_line(rows[0]["platform"]) + "\n",
           "\n".join(f"- {line}" for line in summary_lines(rows)
                     + target_lines(rows, swept, remat_rows=remat_rows or []))
           + "\n"]
  if swept:
    parts += ["## LOST vs full-rank by micro-batch size\n", sweep_table(swept) + "\n",
              "\n".join(f"- {line}" for line in fit_lines(swept)) + "\n"]
  if remat_rows:
    parts += ["## Rematerialisation (`--remat`)\n",
              remat_table(rows + swept + remat_rows) + "\n"]
  if loop_rows:
    parts += ["## Layer loop (`--layer_loop`, `model.perf.layer_loop`)\n",
              loop_table(rows + loop_rows) + "\n", LOOP_NOTES]
  dot_rows = [next(r for r in rows if r["method"] == m) for m in ("full_rank", "lost")
              if any(r["method"] == m for r in rows)] or rows[:1]
  parts += [NOTES, "Matmul dtypes in the compiled step (smallest size measured):\n",
            "\n".join(f"- {dot_line(r)}" for r in dot_rows) + "\n"]
  with open(path, "w") as fh:
    fh.write("\n".join(parts))


def low_bit_table(rows32: list[dict], rows8: list[dict]) -> str:
  """32-bit vs 8-bit optimizer states per (size, method): state bytes, arguments, totals."""
  lines = ["| size | method | micro-batch x passes | optimizer | optimizer state | arguments | "
           "temp | **total** | state x 32-bit | **total x 32-bit** | estimate: state / total |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r8 in rows8:
    r32 = next(r for r in rows32 if (r["size"], r["method"]) == (r8["size"], r8["method"]))
    for r in (r32, r8):
      ratio = r is r8
      lines.append(
          f"| {r['size']} | {r['method']} | {r['microbatch']} x {r['microbatches']} | "
          f"{r['optimizer']} | {gib(r['opt_state_bytes'])} | {gib(r['argument'])} | "
          f"{gib(r['temp'])} | **{gib(r['total'])}** | "
          + (f"{r8['opt_state_bytes'] / r32['opt_state_bytes']:.2f} | "
             f"**{r8['total'] / r32['total']:.2f}** | " if ratio else "1.00 | 1.00 | ")
          + f"{gib(r['estimate']['optimizer'])} / {gib(r['estimate']['total'])} |")
  return "\n".join(lines)


def finetune_table(rows: list[dict]) -> str:
  """SparseLoRA fine-tune step: unquantised vs NF4 base, measured beside the accounting."""
  lines = ["| preset | base | frozen base + estimators (rest) | accounting: frozen base | "
           "LoRA params + optimizer | arguments | temp | **total** | **x bf16 base** |",
           "|---|---|---|---|---|---|---|---|---|"]
  ref = next((r for r in rows if r["quantize"] == "none"), rows[0])
  for r in rows:
    lines.append(f"| {r['preset']} | {'bf16' if r['quantize'] == 'none' else r['quantize']} | "
                 f"{gib(r['static_bytes'])} | {gib(r['base_estimate'])} | "
                 f"{gib(r['params_bytes'] + r['opt_state_bytes'])} | {gib(r['argument'])} | "
                 f"{gib(r['temp'])} | **{gib(r['sum'])}** | **{r['sum'] / ref['sum']:.2f}** |")
  return "\n".join(lines)


LOOP_NOTES = """- **scan** stacks the blocks' parameters (and static indices) on a layer axis inside
  the step and runs one `jax.lax.scan`: the compiler sees one block instead of n_layers. The
  parameters themselves stay one array per block (the checkpoint layout), so the stacked copy
  and the stacked gradients it hands back are extra buffers, visible in `temp`.
- **compile s** is this run's wall time from building the step to the compiled executable,
  on a shared 2-core host (other jobs running): compare the two loops, not across runs.
"""


def low_bit_lines(rows32: list[dict], rows8: list[dict], ft_rows: list[dict]) -> list[str]:
  """One sentence per comparison: what 8-bit states and an NF4 base change in the step."""
  out = []
  for r8 in rows8:
    r32 = next(r for r in rows32 if (r["size"], r["method"]) == (r8["size"], r8["method"]))
    out.append(f"{r8['size']} {r8['method']}: 8-bit states {gib(r8['opt_state_bytes'])} vs "
               f"{gib(r32['opt_state_bytes'])} GiB; step total {gib(r8['total'])} vs "
               f"{gib(r32['total'])} GiB ({r8['total'] / r32['total']:.2f} x); temporaries "
               f"{gib(r8['temp'])} vs {gib(r32['temp'])} GiB")
  ref = next((r for r in ft_rows if r["quantize"] == "none"), None)
  for r in ft_rows:
    if ref is not None and r is not ref:
      out.append(f"{r['preset']} SparseLoRA step, {r['quantize']} base: total {gib(r['sum'])}"
                 f" vs {gib(ref['sum'])} GiB with a bf16 base ({r['sum'] / ref['sum']:.2f} x);"
                 f" frozen arguments {gib(r['static_bytes'])} vs {gib(ref['static_bytes'])}"
                 " GiB")
  return out


LOW_BIT_NOTES = """- **8-bit states** (`train.optimizer=adamw8bit`, `galore8bit`): each Adam moment of at
  least 4096 values is stored as uint8 codes (one byte per value) plus a float32 scale per
  256 values of the last axis (the second moment as sqrt(nu)); smaller moments stay in the
  parameter dtype. Inside the compiled step the update direction is elementwise in the
  gradient and the stored codes, so it fuses into the parameter update; the new codes and
  scales are written over the donated old ones in row chunks of about 2^20 values
  (`optim.in_row_chunks`), so the float32 workspace is one chunk's. A step whose loss or
  gradient is not finite is skipped by a `lax.cond`, which lets the update overwrite the
  state in place. Where the backward pass sets the step's peak, the temporaries are then
  the same for 32-bit and 8-bit states. Where the optimizer's phase does, 8-bit temporaries
  can be larger by up to the size of the two code tensors (one byte per value each): XLA:CPU
  appears to keep a copy of the old codes, which the fused update direction still reads
  after they are rewritten in place; computing the update inside the same chunk loop would
  remove it (not done yet).
- **estimate** = `lost_jax.accounting.memory_estimate` (optimizer state / total: weights,
  one set of gradients, optimizer state, one micro-batch's activations); it counts 8-bit
  states as the step stores them.
- **4-bit base** (`init.quantize=nf4`): every block projection kernel is stored as NF4 (two
  codes per byte) plus a float32 scale per 64 values (4.5 bits per weight; no double
  quantisation of the scales); embedding, LM head and norms stay bf16. The 'rest' column is
  all frozen arguments: base weights plus the rank-8 SVD estimators;
  'accounting: frozen base' is `accounting.base_weight_bytes` (the base weights alone).
- Both tables are XLA:CPU buffer sums (arguments + temp + output - alias) of one step for
  one device; XLA:CPU computes matmuls in float32 (see the main memory page), so temporaries
  are larger than on a bf16 accelerator.
"""


def write_low_bit_markdown(path: str, command: str, rows32: list[dict], rows8: list[dict],
                           ft_rows: list[dict]) -> None:
  """The 8-bit-state and 4-bit-base memory page."""
  parts = ["# Memory with 8-bit optimizer states and a 4-bit frozen base\n",
           common.page_head(command)]
  if rows8:
    parts += [settings_line(rows8) + ". Memory in GiB per device.\n",
              "## Pre-training: 32-bit vs 8-bit AdamW states\n", low_bit_table(rows32, rows8)
              + "\n"]
  if ft_rows:
    r = ft_rows[0]
    parts += ["## SparseLoRA fine-tune: bf16 vs NF4 base\n",
              f"jax {jax.__version__} | {r['preset']} shape, random base | precision pure_bf16 "
              f"(base, LoRA and moments bf16) | LoRA r={r['lora_rank']} on {r['targets']} | "
              f"{r['seqs']} sequence of {r['seq_len']} tokens, dense suffix {r['dense_len']} | "
              "SparseLoRA as the preset (estimators built from the base). Memory in GiB.\n",
              finetune_table(ft_rows) + "\n"]
  lines = low_bit_lines(rows32, rows8, ft_rows)
  if lines:
    parts += ["## Summary\n", "\n".join(f"- {line}" for line in lines) + "\n"]
  parts += ["## Notes\n", LOW_BIT_NOTES]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as fh:
    fh.write("\n".join(parts))


def loss_table(rows: list[dict]) -> str:
  """Plain vs fused loss per method: arguments, temp, total and x the plain loss's total."""
  lines = ["| size | method | vocab | tokens per step | loss | arguments | temp | **total** | "
           "**x plain** | total saved |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    plain = next(p for p in rows if p["method"] == r["method"] and p["loss_chunk"] == 0)
    loss = ("plain ([tokens, vocab] float32 logits)" if r["loss_chunk"] == 0 else
            f"fused, chunks of {r['loss_chunk']} positions x {r['microbatch']} rows")
    lines.append(f"| {r['size']} | {r['method']} | {r['vocab']} | {r['microbatch']} x "
                 f"{r['seq_len']} | {loss} | {gib(r['argument'])} | {gib(r['temp'])} | "
                 f"**{gib(r['total'])}** | **{r['total'] / plain['total']:.2f}** | "
                 f"{gib(plain['total'] - r['total'])} |")
  return "\n".join(lines)


def write_loss_markdown(path: str, command: str, rows: list[dict]) -> None:
  """The plain-vs-fused LM head + cross-entropy memory page."""
  r = rows[0]
  logits = r["microbatch"] * r["seq_len"] * r["vocab"] * 4
  parts = ["# Training-step memory: plain vs fused LM head + cross-entropy\n",
           common.page_head(command),
           settings_line(rows) + f" | vocab {r['vocab']}"
           + (" (LLaMA-3)" if r["vocab"] == 128256 else "") + ". Memory in GiB per device.\n",
           loss_table(rows) + "\n",
           f"- The plain loss materialises the [{r['microbatch'] * r['seq_len']}, {r['vocab']}] "
           f"float32 logits ({gib(logits)} GiB) and, in the backward pass, their gradient of "
           "the same size. The fused loss (`lost_jax.losses.fused_cross_entropy`, "
           "`model.perf.loss_chunk`) walks the sequence in chunks with an online log-sum-exp "
           "and forms the gradients while each chunk's logits exist: what outlives a chunk is "
           "the per-token NLL, the hidden states' gradient and the head's gradient.",
           "- Same step, same compiler (`compiled.memory_analysis()` of the real "
           "`train.make_train_step`, lowered on abstract inputs); see `memory.md` for what "
           "arguments / temp / total mean and the caveats of compiling for the CPU.\n"]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as fh:
    fh.write("\n".join(parts))


def settings_line(rows: list[dict]) -> str:
  """What every row shares: jax, device, precision, batch, model.perf and the total's meaning."""
  r = rows[0]
  perf = r.get("perf") or {}
  return (f"jax {jax.__version__} | {r['platform']} ({r['device']}) | precision {r['precision']}"
          f" | global batch {r['global_batch']} x {r['seq_len']} tokens | model.perf resolved "
          f"for {r['platform']}: matmul backward {perf.get('matmul_backward')}, attention "
          f"{perf.get('attention')} (implementation {perf.get('attention_impl')}), layer loop "
          f"{perf.get('layer_loop')} | total = "
          f"{total_label(r['platform'])}")
