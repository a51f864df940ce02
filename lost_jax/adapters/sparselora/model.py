"""SparseLoRA: contextual channel sparsity of the frozen base projections during LoRA training.

Per layer and step, an index set of base channels is chosen for the whole micro-batch, from a
rank-r estimator of the frozen kernels (`mode='svd'`; the paper's SVD or the activation-aware
one, `sparse.estimator`) or, for accuracy studies only, from the true activations
(`mode='oracle'`). Context tokens (the sparse prefix of a left-padded
batch) use only those channels of the base kernels, forward and backward; the dense suffix
(every token with a loss) and the LoRA branch stay dense (SparseLoRA, arXiv 2506.16500).

Semantics (what "restricted" means everywhere below and in the tests): for sparse tokens each
base kernel is replaced by a masked copy — gate/up/q/k/v keep only the selected OUTPUT
columns, down/o only the selected INPUT rows — while LoRA adapters are unchanged. The gather
path computes exactly that with smaller matmuls (gathered kernel columns/rows); q/k/v
outputs are scattered back to full width (zeros elsewhere, as in the reference), the dense
LoRA delta is added, then RoPE and attention run dense over all tokens and all head dims.

Channel scores:
- FFN: x_bar = mean of the normed hidden state over the valid sparse-prefix tokens of each
  sequence [B, D]; score_j = || act(x_bar P_g Q_g)_j * (x_bar P_u Q_u)_j ||_2 over the batch
  (act: the model's gated activation, silu or gelu_tanh).
- attention (all valid sparse-prefix tokens, no averaging): per-column norms ||y[:, c]||_2
  of y = x P Q (computed exactly through the r x r Gram matrix of x P, so [N, m] estimates are
  never materialised). kv channel (kv head j, dim d):
    qk_score(j, d) = ||k(j, d)|| * sqrt(sum_{h in group j} ||q(h, d)||^2),  v_score = ||v(j, d)||
  (group j = query heads j*G .. j*G+G-1, G = H / KV; G = 1 is the paper's per-channel rule).
  Keeping (j, d) keeps q column (h, d) and o input row (h, d) for every h in group j (q from
  the qk choice, o from the v choice), k_kv = int(KV*hd*(1-s)) and k_q = G * k_kv.
  Deliberate difference from the reference code: its GQA arithmetic averages q over
  `view(G, KV*hd)` (query heads of DIFFERENT kv groups), maps kv channel c to query columns
  c*G + r, and indexes o's H*hd input with kv-sized v indices. We use the mapping above;
  tests/test_sparselora.py pins it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lost_jax.models.llama import GATE_ACTIVATIONS, dense_projection
from lost_jax.ops.select import top_k_indices
from lost_jax.adapters.sparselora.estimator import layer_key
from lost_jax.adapters.sparselora.plan import SparsityPlan, StepLengths
from lost_jax.adapters.sparselora.restrict import restricted_projection, sparse_mlp
from lost_jax.adapters.sparselora.select import (column_norms, ffn_scores, keep_count,
                                                 low_rank_column_norms, random_scores,
                                                 select_attention)


def ffn_indices(mlp, x_BxLxD, mask_BxL, est_layer, sparsity, mode):
  """int32 [k] kept FFN channels of one layer, scored by mode (svd, oracle or random)."""
  f = mlp.gate.out_features
  k = keep_count(f, sparsity)
  x = jax.lax.stop_gradient(x_BxLxD)
  if mode == "random":
    return top_k_indices(random_scores(x, f, 0), k)
  if mode == "svd":
    return top_k_indices(ffn_scores(x, mask_BxL, est_layer["gate"], est_layer["up"],
                                    mlp.activation), k)
  act = GATE_ACTIVATIONS[mlp.activation](mlp.gate(x)) * mlp.up(x)
  return top_k_indices(column_norms(act, mask_BxL), k)


def attn_indices(attn, x_BxLxD, mask_BxL, est_layer, sparsity, mode):
  """AttnIndices kept by one attention layer, scored by mode (svd, oracle or random)."""
  x = jax.lax.stop_gradient(x_BxLxD)
  if mode == "random":
    c = attn.k.out_features
    norms = [random_scores(x, attn.q.out_features, 1), random_scores(x, c, 2),
             random_scores(x, c, 3)]
  elif mode == "svd":
    norms = [low_rank_column_norms(x, mask_BxL, est_layer[n]["p"], est_layer[n]["q"])
             for n in ("q", "k", "v")]
  else:
    norms = [column_norms(getattr(attn, n)(x), mask_BxL) for n in ("q", "k", "v")]
  return select_attention(*norms, sparsity, attn.n_heads, attn.n_kv_heads)


class LayerChannels:
  """One layer's SparseLoRA channel plan for `model.Llama`'s forward (see model.DenseChannels).

  Selects the layer's channels from its normed inputs (estimator or oracle) and restricts the
  base projections on the first n_sparse tokens; the chosen indices are kept in `indices`.
  """

  def __init__(self, *, layer: int, plan: SparsityPlan, estimators: dict | None,
               n_sparse: int, valid_BxL: jax.Array, how: str):
    self.layer, self.plan, self.estimators = layer, plan, estimators
    self.n_sparse, self.valid_BxL, self.how = n_sparse, valid_BxL, how
    self.indices: dict = {"attn": None, "ffn": None}

  def _sparse(self, which: str) -> bool:
    return getattr(self.plan, which)[self.layer] > 0 and self.n_sparse > 0

  def dense_from(self) -> int:
    """Tokens from n_sparse on run dense (all of them in a layer without sparsity)."""
    return self.n_sparse if self._sparse("attn") or self._sparse("ffn") else 0

  def attention_projection(self, attn, h_BxLxD: jax.Array):
    if not self._sparse("attn"):
      return dense_projection
    est = (_layer_est(self.estimators, self.layer, ("q", "k", "v"))
           if self.plan.mode == "svd" else None)
    idx = attn_indices(attn, *self._estimator_inputs(h_BxLxD), est, self.plan.attn[self.layer],
                       self.plan.mode)
    self.indices["attn"] = idx
    return functools.partial(restricted_projection, idx=idx, n_sparse=self.n_sparse,
                             how=self.how, block_grad=self.plan.block_input_grad)

  def _estimator_inputs(self, h_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(h, valid) of the tokens the channel scores see: the context, or every token."""
    if self.plan.estimator_tokens == "all":
      return h_BxLxD, self.valid_BxL
    return h_BxLxD[:, :self.n_sparse], self.valid_BxL[:, :self.n_sparse]

  def mlp(self, mlp, h_BxLxD: jax.Array) -> jax.Array:
    if not self._sparse("ffn"):
      return mlp(h_BxLxD)
    est = (_layer_est(self.estimators, self.layer, ("gate", "up"))
           if self.plan.mode == "svd" else None)
    idx = ffn_indices(mlp, *self._estimator_inputs(h_BxLxD), est, self.plan.ffn[self.layer],
                      self.plan.mode)
    self.indices["ffn"] = idx
    return sparse_mlp(mlp, h_BxLxD, idx, self.n_sparse, self.how,
                      self.plan.block_input_grad)


def _layer_est(estimators, i: int, modules):
  if estimators is None or layer_key(i) not in estimators:
    raise ValueError(f"SparseLoRA: layer {i} is sparse but has no estimator. Fix: "
                     "build_estimators(model, layers=plan.estimator_layers()) or load them.")
  est = estimators[layer_key(i)]
  missing = [m for m in modules if m not in est]
  if missing:
    raise ValueError(f"SparseLoRA: layer {i} estimator lacks {missing}.")
  return est


def forward(model, tokens_BxL: jax.Array, estimators: dict | None, plan: SparsityPlan,
            dense_len: int, positions_BxL: jax.Array | None = None,
            segment_ids_BxL: jax.Array | None = None, valid_BxL: jax.Array | None = None,
            return_indices: bool = False, logits_from: int = 0, head: bool = True,
            wrap=None):
  """SparseLoRA Llama forward: float32 logits [B, L - logits_from, V] (+ indices if asked).

  `model(...)` with one `LayerChannels` per layer. plan and dense_len are static (python);
  tokens [:L - dense_len] are the sparse context. valid marks real tokens for the estimator
  (default: segment_ids > 0, else all). logits_from (static) skips the LM head on earlier
  positions: with L - dense_len, only the dense suffix, which holds every loss position,
  pays for the [D, V] matmul. head=False: hidden states instead of logits (`Llama`).
  wrap: LayerChannels -> the layer's channel plan (calibration's per-layer probes).
  If positions >= logits_from are dense in the last layer, its o and MLP run on those rows
  only (`Llama`), so that layer selects no FFN channels (its "ffn" index is None).
  """
  b, length = tokens_BxL.shape
  if plan.n_layers != len(model.layers):
    raise ValueError(f"SparsityPlan has {plan.n_layers} layers, the model "
                     f"{len(model.layers)}. Fix: build the plan with n_layers={len(model.layers)}.")
  if not isinstance(dense_len, int) or not 0 <= dense_len <= length:
    raise ValueError(f"dense_len={dense_len!r} must be a python int in 0..{length} "
                     "(static). Fix: dense_suffix_len(loss_mask, bucket).")
  if return_indices and model.cfg.remat:
    raise ValueError("return_indices needs model.remat=False (indices chosen inside a "
                     "rematerialised block cannot leave it). Fix: set model.remat=False.")
  if valid_BxL is None:
    valid_BxL = (segment_ids_BxL > 0 if segment_ids_BxL is not None
                 else jnp.ones((b, length), bool))
  how = "mask" if plan.mode == "oracle" else "gather"
  channels = [LayerChannels(layer=i, plan=plan, estimators=estimators,
                            n_sparse=length - dense_len, valid_BxL=valid_BxL, how=how)
              for i in range(plan.n_layers)]
  plans = channels if wrap is None else [wrap(ch) for ch in channels]
  # A step with no sparse layer runs the plain dense forward (any model.perf.layer_loop).
  dense = dense_len == length or not any(plan.ffn + plan.attn)
  logits = model(tokens_BxL, positions_BxL, segment_ids_BxL, logits_from=logits_from,
                 channels=None if dense else plans, head=head)
  return (logits, [ch.indices for ch in channels]) if return_indices else logits


class Estimator(nnx.Variable):
  """Frozen low-rank estimator factor: saved with the model, never trained."""


class SparseLoRALlama(nnx.Module):
  """Llama (with LoRA applied) + its estimators + a static plan; __call__ = `forward`."""

  def __init__(self, model, estimators: dict | None, plan: SparsityPlan):
    self.model = model
    self.plan = plan
    est = {} if estimators is None else estimators
    self.estimators = nnx.data(jax.tree.map(Estimator, est))

  @property
  def cfg(self):
    """The wrapped Llama's model config (its resolved `perf` settings)."""
    return self.model.cfg

  @property
  def lm_head(self):
    """The wrapped Llama's LM head (for a loss that applies it itself)."""
    return self.model.lm_head

  def __call__(self, tokens_BxL: jax.Array, lengths: int | StepLengths, positions_BxL=None,
               segment_ids_BxL=None, valid_BxL=None, head: bool = True) -> jax.Array:
    """Logits [B, logits_len, V] of the last logits_len positions (all for an int dense_len);
    head=False: the hidden states [B, logits_len, D] instead."""
    if not isinstance(lengths, StepLengths):
      lengths = StepLengths(lengths, tokens_BxL.shape[1])
    est = jax.tree.map(lambda v: v[...], self.estimators,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
    return forward(self.model, tokens_BxL, est, self.plan, lengths.dense_len, positions_BxL,
                   segment_ids_BxL, valid_BxL,
                   logits_from=tokens_BxL.shape[1] - lengths.logits_len, head=head)


