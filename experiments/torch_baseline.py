"""A plain PyTorch (CPU, torch.compile) LLaMA train step at lost_jax's dims: full-rank or LOST.

The reference point for `experiments/throughput.py --torch`: the same architecture as
`lost_jax.model.Llama` (pre-norm RMSNorm, rotate-half RoPE, SwiGLU,
causal attention via scaled_dot_product_attention, untied head), float32 cross-entropy,
global-norm clipping and AdamW; projections are `nn.Linear` (full_rank) or the LOST layer
gamma * silu(x A) B^T + (1 - gamma) * x[..., I] S with lost_jax's rank and kept-channel count
(timing does not depend on the factors' values, so they are random here). `mixed` runs the forward under
`torch.autocast("cpu", torch.bfloat16)` with float32 parameters and optimizer state, the
usual PyTorch mixed precision. The step is what a careful PyTorch user runs on CPU (see
`make_runner`): compiled forward/backward and clipping, fused AdamW, denormals flushed,
threads pinned to the cores XLA uses; the model code itself is plain.

  python -m experiments.torch_baseline --size=llama_60m --method=lost --precision=mixed
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from typing import Callable

import ml_collections
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([-x2, x1], dim=-1)


class LOSTLinear(nn.Module):
  """gamma * silu(x @ a) @ b.T + (1 - gamma) * x[..., idx] @ values."""

  def __init__(self, n: int, m: int, rank: int, keep: int, gamma: float):
    super().__init__()
    self.gamma = gamma
    self.a = nn.Parameter(torch.randn(n, rank) / n ** 0.5)
    self.b = nn.Parameter(torch.randn(m, rank) / rank ** 0.5)
    self.values = nn.Parameter(torch.randn(keep, m) / keep ** 0.5)
    self.register_buffer("idx", torch.randperm(n)[:keep].sort().values)

  def forward(self, x):
    low = F.linear(F.silu(x @ self.a.to(x.dtype)), self.b.to(x.dtype))
    return self.gamma * low + (1.0 - self.gamma) * (x[..., self.idx] @ self.values.to(x.dtype))


def make_linear(m: ml_collections.ConfigDict, n: int, out: int) -> nn.Module:
  """nn.Linear for dense configs, LOSTLinear for model.linear.kind == 'lost'."""
  lin = m.linear
  if lin.kind == "dense":
    return nn.Linear(n, out, bias=False)
  if lin.kind != "lost":
    raise ValueError(f"torch baseline has no {lin.kind!r} layer: use full_rank or lost.")
  keep = max(1, math.ceil(lin.sparsity * n - 1e-9))
  return LOSTLinear(n, out, lin.rank, keep, lin.gamma)


class Block(nn.Module):
  def __init__(self, m: ml_collections.ConfigDict):
    super().__init__()
    d, f = m.d_model, m.ffn_dim
    self.n_heads, self.head_dim = m.n_heads, d // m.n_heads
    self.attn_norm, self.mlp_norm = RMSNorm(d, m.norm_eps), RMSNorm(d, m.norm_eps)
    self.q, self.k, self.v, self.o = (make_linear(m, d, d) for _ in range(4))
    self.gate, self.up = make_linear(m, d, f), make_linear(m, d, f)
    self.down = make_linear(m, f, d)

  def forward(self, x, cos, sin):
    b, length, d = x.shape
    h = self.attn_norm(x).to(x.dtype)
    shape = (b, length, self.n_heads, self.head_dim)
    q, k, v = (p(h).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q, k = q.to(v.dtype), k.to(v.dtype)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.o(att.transpose(1, 2).reshape(b, length, d))
    h = self.mlp_norm(x).to(x.dtype)
    return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
  """tokens [B, L] -> float32 logits [B, L, V]."""

  def __init__(self, m: ml_collections.ConfigDict):
    super().__init__()
    self.m = m
    self.embed = nn.Embedding(m.vocab_size, m.d_model)
    self.layers = nn.ModuleList(Block(m) for _ in range(m.n_layers))
    self.final_norm = RMSNorm(m.d_model, m.norm_eps)
    self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
    for p in self.parameters():
      if p.dim() == 2:
        nn.init.normal_(p, std=m.init_std)

  def forward(self, tokens):
    length, hd = tokens.shape[1], self.m.d_model // self.m.n_heads
    inv = 1.0 / (self.m.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(length).float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos(), ang.sin()
    x = self.embed(tokens)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    x = x.to(dtype)
    for block in self.layers:
      x = block(x, cos, sin)
    return self.lm_head(self.final_norm(x).to(dtype)).float()


def host_threads() -> int:
  """CPUs this process may run on: the size of XLA:CPU's own intra-op thread pool."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_lost_jax(model: Llama, flat: dict[str, np.ndarray]) -> None:
  """Copy a lost_jax Llama's parameters and LOST channel indices into `model`.

  flat: '/'-joined lost_jax paths ('layers/0/attn/q/kernel', ...) -> arrays. Kernels are
  stored [in, out] in lost_jax and [out, in] in nn.Linear.
  """
  def put(param, value):
    with torch.no_grad():
      param.copy_(torch.from_numpy(np.array(value, np.float32)))
  put(model.embed.weight, flat["embed/embedding"])
  put(model.final_norm.weight, flat["final_norm/scale"])
  put(model.lm_head.weight, np.asarray(flat["lm_head/kernel"]).T)
  for i, block in enumerate(model.layers):
    pre = f"layers/{i}/"
    put(block.attn_norm.weight, flat[pre + "attn_norm/scale"])
    put(block.mlp_norm.weight, flat[pre + "mlp_norm/scale"])
    for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      for name in names:
        lin, key = getattr(block, name), f"{pre}{group}/{name}/"
        if isinstance(lin, LOSTLinear):
          put(lin.a, flat[key + "a"])
          put(lin.b, flat[key + "b"])
          put(lin.values, flat[key + "values"])
          lin.idx.copy_(torch.from_numpy(np.asarray(flat[key + "indices"], np.int64)))
        else:
          put(lin.weight, np.asarray(flat[key + "kernel"]).T)


def param_groups(model: Llama, train: ml_collections.ConfigDict) -> list[dict]:
  """AdamW groups as lost_jax's decay mask: norm scales and the embedding undecayed unless
  train.decay_norms_and_embeddings."""
  if train.decay_norms_and_embeddings:
    return [{"params": list(model.parameters())}]
  skip = lambda name: name.endswith("norm.weight") or name == "embed.weight"
  named = list(model.named_parameters())
  return [{"params": [p for n, p in named if not skip(n)]},
          {"params": [p for n, p in named if skip(n)], "weight_decay": 0.0}]


def make_runner(cfg: ml_collections.ConfigDict, seed: int = 0, compile_model: bool = True,
                params: dict[str, np.ndarray] | None = None) -> Callable[[int], list[float]]:
  """run(n) -> wall seconds of n train steps of a torch model shaped like cfg (dense or LOST).

  cfg: a lost_jax run config (model dims, train.batch_size, data.seq_len, train.precision
  float32 | mixed, the optimizer and schedule settings of train). The step, as a careful
  PyTorch user writes it for CPU: forward + loss compiled by torch.compile (AOTAutograd
  compiles its backward too), global-norm clipping compiled (one foreach kernel), AdamW with
  fused=True (one kernel; torch.compile deliberately does not trace it), the learning rate
  of lost_jax's schedule at every step, denormals flushed to zero (as XLA:CPU does) and
  `host_threads()` intra-op threads. Tokens: numpy default_rng(seed), drawn exactly as
  `experiments.throughput.synthetic_batch` draws them. params: lost_jax parameters to start
  from (`load_lost_jax`; default: a fresh torch init). Runs (and compiles) step 0 on creation;
  run.loss is the loss of the last step run, run.step the steps run so far.
  """
  if cfg.train.precision not in ("float32", "mixed"):
    raise ValueError(f"torch baseline precision {cfg.train.precision!r}: use float32 or mixed.")
  from lost_jax.training import optim  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  torch.set_flush_denormal(True)
  torch.set_num_threads(host_threads())
  model = Llama(cfg.model)
  if params is not None:
    load_lost_jax(model, params)
  t = cfg.train
  lrs = np.asarray(optim.lr_schedule(t)(np.arange(max(t.steps, 1) + 1)), np.float64)
  opt = torch.optim.AdamW(param_groups(model, t), lr=float(lrs[0]), betas=(t.b1, t.b2),
                          eps=t.eps, weight_decay=t.weight_decay, fused=True)
  mixed = cfg.train.precision == "mixed"
  rng = np.random.default_rng(seed)
  tokens = torch.from_numpy(rng.integers(0, cfg.model.vocab_size,
                                         (t.batch_size, cfg.data.seq_len + 1),
                                         dtype=np.int32).astype(np.int64))
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
  params_list = list(model.parameters())

  def loss_fn(inputs, targets):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
    with ctx:
      logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

  def clip_fn():
    torch.nn.utils.clip_grad_norm_(params_list, t.clip_norm, foreach=True)

  loss_c = torch.compile(loss_fn) if compile_model else loss_fn
  clip_c = torch.compile(clip_fn) if compile_model else clip_fn

  def step():
    for group in opt.param_groups:
      group["lr"] = float(lrs[min(run.step, len(lrs) - 1)])
    loss = loss_c(inputs, targets)
    loss.backward()
    if t.clip_norm > 0:
      clip_c()
    opt.step()
    opt.zero_grad(set_to_none=True)
    run.step += 1
    return float(loss.detach())

  def run(n: int) -> list[float]:
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      run.loss = step()
      times.append(time.perf_counter() - t0)
    return times

  run.loss, run.step, run.inputs = float("nan"), 0, inputs
  run(1)   # compiles
  return run


def _main():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from lost_jax import configs  # pylint: disable=g-import-not-at-top
  from lost_jax.training import accounting  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("size", "llama_60m", "Size preset.")
  flags.DEFINE_string("method", "full_rank", "full_rank | lost")
  flags.DEFINE_string("precision", "float32", "float32 | mixed")
  flags.DEFINE_integer("batch", 8, "Sequences per step.")
  flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
  flags.DEFINE_integer("steps", 6, "Timed steps after one warm-up.")
  fl = flags.FLAGS

  def main(argv):
    del argv
    cfg = configs.pretrain_config(fl.size, fl.method)
    cfg.train.batch_size, cfg.data.seq_len, cfg.train.precision = (fl.batch, fl.seq_len,
                                                                    fl.precision)
    run = make_runner(cfg)
    run(1)
    step = statistics.median(run(fl.steps))
    tok_s = fl.batch * fl.seq_len / step
    flops = accounting.train_flops_per_token(cfg.model, fl.seq_len)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads) {fl.size} "
          f"{fl.method} {fl.precision}: {step * 1e3:.0f} ms/step, "
          f"{tok_s:,.0f} tokens/s, {tok_s * flops / 1e9:.1f} GFLOP/s, loss {run.loss:.3f}")

  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  _main()
