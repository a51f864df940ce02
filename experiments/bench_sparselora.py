"""Dense LoRA vs SparseLoRA train-step time, following the paper's speed protocol.

A LLaMA3-8B-shaped model (GQA, 32 layers) scaled down to fit a CPU, LoRA r=32 alpha=64 on
q, k, v, o with the base frozen; each step is forward + backward + AdamW on the LoRA
parameters only. Synthetic batches of sequence / output length 512 / 128 (Math), batch 1,
sparsity on from step 0 at the LLaMA3-8B Math config (FFN 0.99 on layers 3-30, attention 0.75
on 14-19, 21-23, 25-29). Both variants are the library's own fine-tuning step, the one
`python -m lost_jax.main finetune` runs (`steps.make_train_step` on `finetune.make_setup` of a
`sparselora.SparseLoRALlama`, with `sparselora.step_lengths`): LoRA is that step with every
token dense. They live in one process, share the frozen weights, and alternate step by step
(ABBA order) after a warm-up, so load from other processes hits both alike. Also reported:
the model FLOP ratio (`flops.sparselora_step_flops`) and
the estimator's share of the sparse step (estimator + top-k selection of every sparse layer,
jitted alone on the same hidden states).

  python -m experiments.bench_sparselora                  # CPU -> docs/benchmarks/sparselora.md
  python -m experiments.bench_sparselora --d_model=4096 --ffn_dim=14336 --n_heads=32 \
      --n_kv_heads=8 --vocab_size=128256 --dtype=bfloat16 --exact_svd --out_md=''  # real 8B
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import bench_sparselora_report as bench_report
from experiments import common, runs
from lost_jax import configs
from lost_jax.measure import flops
from lost_jax.recipes import finetune
from lost_jax.parallel import sharding
from lost_jax.training import state as train_state
from lost_jax.training import steps as train_steps
from lost_jax.training import xla_setup
from lost_jax.models import llama as model_lib
from lost_jax.adapters.sparselora import model as sl
from lost_jax.adapters.lora import LoRAParam, apply_lora
from lost_jax.models.llama import Llama
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.adapters.sparselora import select as sl_select
from lost_jax.adapters.sparselora import estimator as sl_estimator

MATH_FFN = (0.99, "3-30")
MATH_ATTN = (0.75, "14-19,21-23,25-29")
LORA_TARGETS = flops.LORA_TARGETS


def bench_model_config(n_layers: int = 32, d_model: int = 1024, ffn_dim: int = 3584,
                       n_heads: int = 8, n_kv_heads: int = 2, vocab_size: int = 32000,
                       dtype: str = "float32") -> ml_collections.ConfigDict:
  """LLaMA3-8B-shaped model config (head dim d_model / n_heads, rope theta 5e5), dense."""
  cfg = configs.model_config("quickstart")
  cfg.update(dict(vocab_size=vocab_size, d_model=d_model, ffn_dim=ffn_dim, n_layers=n_layers,
                  n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=500_000.0,
                  norm_eps=1e-5, dtype=dtype, param_dtype="float32", remat=False))
  configs.validate_model(cfg)
  return cfg


# ----------------------------------------------------------------------------------------------
# Model, estimators, batch and steps.


def build_lora_model(cfg: ml_collections.ConfigDict, lora_rank: int, lora_alpha: float,
                     seed: int = 0) -> Llama:
  """Random dense Llama built by one jitted init (no eager per-kernel ops) + LoRA adapters."""
  model = nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))()
  apply_lora(model, LORA_TARGETS, rank=lora_rank, alpha=lora_alpha, rngs=nnx.Rngs(seed + 1))
  # B = 0 at init would make the first gradients of A zero; any values cost the same.
  state = nnx.state(model, LoRAParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  return model


def fast_estimators(model: Llama, layers, rank: int = 8, iters: int = 4, seed: int = 0
                    ) -> dict:
  """Rank-r factors (P = U sqrt(s), Q = sqrt(s) V^T) by jitted subspace iteration.

  The same layout as `sparselora.build_estimators`; its exact CPU SVDs take about a minute
  per kernel here. Timing does not depend on the factors' values (only on which channels
  are kept, and every choice costs the same), so approximate top singular vectors suffice.
  """
  @jax.jit
  def factors(kernel, key):
    k = kernel.astype(jnp.float32)
    y = k @ jax.random.normal(key, (k.shape[1], 2 * rank), jnp.float32)
    for _ in range(iters):
      basis, _ = jnp.linalg.qr(y)
      y = k @ (k.T @ basis)
    basis, _ = jnp.linalg.qr(y)                               # [n, 2r] spans top space
    u, s, vt = jnp.linalg.svd(basis.T @ k, full_matrices=False)  # small [2r, m] SVD
    root = jnp.sqrt(s[:rank])
    return (basis @ u[:, :rank]) * root[None, :], root[:, None] * vt[:rank]

  est, key = {}, jax.random.key(seed)
  for i in layers:
    block = model.layers[i]
    est[sl_estimator.layer_key(i)] = {}
    for name in sl_estimator.EST_MODULES:
      owner = block.mlp if name in ("gate", "up") else block.attn
      key, sub = jax.random.split(key)
      p, q = factors(getattr(owner, name).kernel[...], sub)
      est[sl_estimator.layer_key(i)][name] = {"p": p, "q": q}
  return est


def synthetic_batch(batch: int, seq_len: int, out_len: int, vocab: int, seed: int = 0
                    ) -> dict[str, jax.Array]:
  """Random tokens in the fine-tuning batch layout (one unpadded segment per row); the last
  out_len positions of each row carry the loss (output tokens)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  weights = np.zeros((batch, seq_len), np.float32)
  weights[:, seq_len - out_len:] = 1.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
          "segment_ids": np.ones((batch, seq_len), np.int32), "weights": weights}


class _RecordInputs(model_lib.DenseChannels):
  """A dense channel plan that keeps each block's normed attention and MLP inputs."""

  def __init__(self):
    self.h_attn = self.h_mlp = None

  def attention_projection(self, attn, h_BxLxD):
    self.h_attn = h_BxLxD
    return super().attention_projection(attn, h_BxLxD)

  def mlp(self, mlp, h_BxLxD):
    self.h_mlp = h_BxLxD
    return super().mlp(mlp, h_BxLxD)


def layer_inputs(model: Llama, tokens_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normed inputs of every block's attention and MLP, [n_layers, B, L, D] each."""
  @nnx.jit
  def run(model, tokens):
    rec = [_RecordInputs() for _ in model.layers]
    model(tokens, channels=rec, head=False)     # every block on every position
    return jnp.stack([r.h_attn for r in rec]), jnp.stack([r.h_mlp for r in rec])
  return run(model, tokens_BxL)


def finetune_run_config(cfg: ml_collections.ConfigDict, lora_rank: int, lora_alpha: float,
                        seed: int = 0) -> ml_collections.ConfigDict:
  """A fine-tuning run config (llama3_8b_math's training settings) around model cfg."""
  run = configs.finetune_config("llama3_8b_math")
  run.model = cfg
  run.seed = seed
  run.lora.update(dict(targets=",".join(LORA_TARGETS), rank=lora_rank, alpha=lora_alpha))
  run.train.update(dict(batch_size=1, microbatches=1, lr=1e-4))
  run.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return run


def _groups(plan: sl_plan.SparsityPlan) -> dict[tuple[float, float], list[int]]:
  groups: dict[tuple[float, float], list[int]] = {}
  for i in plan.estimator_layers():
    groups.setdefault((plan.attn[i], plan.ffn[i]), []).append(i)
  return groups


def selection_inputs(plan: sl_plan.SparsityPlan, est: dict, h_attn, h_mlp, n_ctx: int) -> list:
  """Per (attention, FFN) sparsity group: stacked estimators and context hidden states."""
  out = []
  for layers in _groups(plan).values():
    ids = np.asarray(layers)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[est[sl_estimator.layer_key(i)] for i in layers])
    out.append((stacked, h_attn[ids, :, :n_ctx], h_mlp[ids, :, :n_ctx]))
  return out


def make_selection(cfg: ml_collections.ConfigDict, plan: sl_plan.SparsityPlan):
  """Jitted estimator + top-k selection of every sparse layer, on `selection_inputs`.

  Layers of a group run one after the other in a lax.scan, as in the step where each layer
  waits for the previous one: an unrolled loop over independent layers lets XLA fuse the
  layers' reductions side by side, which this CPU backend compiles into far slower loops
  than the step ever runs.
  """
  def one_layer(s_attn, s_ffn, e, x_attn, x_mlp):
    out = []
    if s_attn > 0:
      norms = [sl_select.low_rank_column_norms(x_attn, None, e[m]["p"], e[m]["q"]) for m in "qkv"]
      out.append(sl_select.select_attention(*norms, s_attn, cfg.n_heads, cfg.n_kv_heads))
    if s_ffn > 0:
      score = sl_select.ffn_scores(x_mlp, None, e["gate"], e["up"])
      out.append(sl_select.top_k_indices(score, sl_select.keep_count(cfg.ffn_dim, s_ffn)))
    return out

  def select(inputs):
    out = []
    for (s_attn, s_ffn), xs in zip(_groups(plan), inputs):
      body = lambda c, x, sa=s_attn, sf=s_ffn: (c, one_layer(sa, sf, *x))
      out.append(jax.lax.scan(body, 0, xs)[1])
    return out
  return jax.jit(select)


# ----------------------------------------------------------------------------------------------
# The benchmark.


@dataclasses.dataclass
class Timing:
  """Per-step seconds of one variant (timed steps only)."""
  seconds: list[float]

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  def quantiles(self) -> tuple[float, float]:
    q = np.quantile(self.seconds, [0.25, 0.75])
    return float(q[0]), float(q[1])


def run_benchmark(cfg: ml_collections.ConfigDict, plan: sl_plan.SparsityPlan, *, batch: int = 1,
                  seq_len: int = 512, out_len: int = 128, bucket: int = 64,
                  lora_rank: int = 32, lora_alpha: float = 64.0, estimator_rank: int = 8,
                  warmup: int = 10, steps: int = 30, exact_svd: bool = False, seed: int = 0,
                  full_logits: bool = False, log: Callable[[str], None] = print) -> dict:
  """Interleaved dense-LoRA / SparseLoRA fine-tuning steps; returns timings, FLOPs, settings.

  Unless full_logits, both variants run the LM head on the loss suffix only (as the finetune
  step does; the context's logits would be multiplied by zero weights).
  """
  if not 0 < out_len <= seq_len:
    raise ValueError(f"out_len={out_len} must be in 1..seq_len={seq_len}.")
  t0 = time.perf_counter()
  model = build_lora_model(cfg, lora_rank, lora_alpha, seed)
  layers = plan.estimator_layers()
  est = (sl_estimator.build_estimators(model, estimator_rank, layers) if exact_svd
         else fast_estimators(model, layers, estimator_rank, seed=seed))
  log(f"model + {len(layers)} layers of estimators built in {time.perf_counter() - t0:.1f} s")
  data = synthetic_batch(batch, seq_len, out_len, cfg.vocab_size, seed)

  module = sl.SparseLoRALlama(model, est, plan)
  run_cfg = finetune_run_config(cfg, lora_rank, lora_alpha, seed)
  mesh = sharding.make_mesh(run_cfg.mesh, jax.devices()[:1])
  setup = finetune.make_setup(run_cfg, module, plan, mesh)
  step = train_steps.make_train_step(setup, run_cfg.train.microbatches)
  # The finetune loop's host-side lengths; LoRA = the same step with every token dense.
  sparse_len = sl_plan.step_lengths(np.asarray(data["weights"]), bucket, sparse=True)
  if full_logits:
    sparse_len = sparse_len._replace(logits_len=seq_len)
  lengths = {"lora": sparse_len._replace(dense_len=seq_len), "sparselora": sparse_len}
  dense_len, head_from = sparse_len.dense_len, seq_len - sparse_len.logits_len
  n_ctx = seq_len - dense_len
  state0, rest = setup.init(jax.random.key(run_cfg.seed))
  state = {name: jax.tree.map(jnp.copy, state0) for name in lengths}   # each step donates its own
  del state0
  data = train_state.to_global(data, mesh)
  select = make_selection(cfg, plan)
  sel_inputs = selection_inputs(plan, est, *layer_inputs(model, data["inputs"]), n_ctx)
  del model, module

  losses = {}

  def run(name):
    t = time.perf_counter()
    if name == "estimator":
      jax.block_until_ready(select(sel_inputs))
    else:
      state[name], out = step(state[name], rest, data, lengths[name])
      jax.block_until_ready((state[name], out))   # the AdamW update may end last
      losses[name] = out["loss"]
    return time.perf_counter() - t

  names = ("lora", "sparselora", "estimator")
  for name in names:                                   # compile
    log(f"compiled + first {name} step: {run(name):.1f} s")
  times = {name: [] for name in names}
  load = []                                            # 1-min load average while timing
  for i in range(warmup + steps):
    order = names if i % 2 == 0 else names[1::-1] + names[2:]
    for name in order:
      dt = run(name)
      if i >= warmup:
        times[name].append(dt)
    if i >= warmup:
      load.append(os.getloadavg()[0])
      log(f"step {i - warmup + 1}/{steps}: lora {times['lora'][-1]:.3f} s, sparselora "
          f"{times['sparselora'][-1]:.3f} s, estimator {times['estimator'][-1] * 1e3:.1f} ms")
  kw = dict(batch=batch, seq_len=seq_len, dense_len=dense_len, lora_rank=lora_rank,
            estimator_rank=estimator_rank, logits_len=seq_len - head_from)
  return {
      "timings": {name: Timing(t) for name, t in times.items()},
      "losses": {name: float(v) for name, v in losses.items()},
      "load": load,
      "flops": {"lora": flops.sparselora_step_flops(cfg, sl_plan.SparsityPlan.dense(cfg.n_layers),
                                                **kw),
                "sparselora": flops.sparselora_step_flops(cfg, plan, **kw)},
      "settings": dict(batch=batch, seq_len=seq_len, out_len=out_len, dense_len=dense_len,
                       lora_rank=lora_rank, lora_alpha=lora_alpha, warmup=warmup, steps=steps,
                       estimator_rank=estimator_rank, exact_svd=exact_svd,
                       sparse_layers=len(layers), logits_len=seq_len - head_from),
  }


def bench_plan(cfg: ml_collections.ConfigDict, plan_file: str, ffn: float, ffn_layers: str,
               attn: float, attn_layers: str) -> tuple[sl_plan.SparsityPlan, str]:
  """The plan to time and how the page names it: a plan file (`calibrate`'s, per-layer
  sparsities; refused in one line for a model of another shape), else one FFN and one
  attention sparsity on the listed layers."""
  if plan_file:
    plan = sl_plan.read_plan_file(plan_file, cfg)
    with open(plan_file, encoding="utf-8") as fh:
      record = json.load(fh)
    return plan, (f"the plan file {os.path.basename(plan_file)} (FFN "
                  f"`{record.get('ffn_spec') or 'dense'}`, attention "
                  f"`{record.get('attn_spec') or 'dense'}`)")
  plan = sl_plan.SparsityPlan.from_layers(cfg.n_layers, ffn, ffn_layers, attn, attn_layers)
  attn_text = f"attention {attn:g} on {attn_layers}" if attn and attn_layers else \
      "attention dense"
  return plan, f"FFN {ffn:g} on layers {ffn_layers}, {attn_text}"


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  shape_help = dict(n_layers="Decoder blocks.", d_model="Hidden size (LLaMA3-8B: 4096).",
                    ffn_dim="MLP intermediate size (LLaMA3-8B: 14336).",
                    n_heads="Query heads (LLaMA3-8B: 32).",
                    n_kv_heads="Key/value heads (LLaMA3-8B: 8).",
                    vocab_size="Vocabulary (LLaMA3-8B: 128256).")
  for name, default in bench_report.LLAMA3_8B_SCALED.items():
    flags.DEFINE_integer(name, default, shape_help[name])
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params f32).")
  flags.DEFINE_integer("batch", 1, "Sequences per step.")
  flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
  flags.DEFINE_integer("out_len", 128, "Output (loss) tokens at the end of each sequence.")
  flags.DEFINE_integer("bucket", 64, "Dense-suffix length is rounded up to this.")
  flags.DEFINE_float("ffn_sparsity", MATH_FFN[0], "FFN sparsity on --ffn_layers.")
  flags.DEFINE_string("ffn_layers", MATH_FFN[1], "Layers with sparse FFN, e.g. '3-30'.")
  flags.DEFINE_float("attn_sparsity", MATH_ATTN[0], "Attention sparsity on --attn_layers.")
  flags.DEFINE_string("attn_layers", MATH_ATTN[1], "Layers with sparse attention.")
  flags.DEFINE_string("plan", "", "A plan file (`lost_jax.main calibrate`'s plan.json) "
                      "instead of --ffn_* / --attn_*; it must fit the model's shape.")
  flags.DEFINE_integer("lora_rank", 32, "LoRA rank.")
  flags.DEFINE_float("lora_alpha", 64.0, "LoRA alpha.")
  flags.DEFINE_integer("estimator_rank", 8, "SVD estimator rank.")
  flags.DEFINE_bool("exact_svd", False, "Exact SVD estimators (slow on CPU) instead of "
                    "subspace iteration; timing is the same either way.")
  flags.DEFINE_bool("full_logits", False, "LM head on every token instead of the dense "
                    "(loss) suffix only, in both variants.")
  flags.DEFINE_integer("warmup", 10, "Warm-up steps per variant.")
  flags.DEFINE_integer("steps", 30, "Timed steps per variant.")
  flags.DEFINE_integer("seed", 0, "Seed of weights and batch.")
  flags.DEFINE_string("out_md", "docs/benchmarks/sparselora.md",
                      "Write the markdown report here ('' = print only), and its record "
                      "(bench_sparselora_report.record) beside it as .json.")


def _main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  fl = flags.FLAGS
  cfg = bench_model_config(fl.n_layers, fl.d_model, fl.ffn_dim, fl.n_heads, fl.n_kv_heads,
                           fl.vocab_size, fl.dtype)
  plan, plan_text = bench_plan(cfg, fl.plan, fl.ffn_sparsity, fl.ffn_layers,
                               fl.attn_sparsity, fl.attn_layers)
  result = run_benchmark(cfg, plan, batch=fl.batch, seq_len=fl.seq_len, out_len=fl.out_len,
                         bucket=fl.bucket, lora_rank=fl.lora_rank, lora_alpha=fl.lora_alpha,
                         estimator_rank=fl.estimator_rank, warmup=fl.warmup, steps=fl.steps,
                         exact_svd=fl.exact_svd, seed=fl.seed, full_logits=fl.full_logits)
  text = bench_report.report(result, cfg, plan_text, common.command_line())
  print(text)
  if fl.out_md:
    os.makedirs(os.path.dirname(fl.out_md) or ".", exist_ok=True)
    with open(fl.out_md, "w") as fh:
      fh.write(text)
    runs.write_json(os.path.splitext(fl.out_md)[0] + ".json",
                    bench_report.record(result, cfg, plan, plan_text, common.command_line(),
                                        runs.code_version()))


if __name__ == "__main__":
  xla_setup.configure()   # before the first JAX computation
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  common.code_version_line()   # the code this run starts on
  app.run(_main, flags_parser=common.parse_flags)
