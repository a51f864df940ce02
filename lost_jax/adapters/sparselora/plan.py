"""The static SparseLoRA plan: per-layer sparsity, and each step's static lengths."""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import numpy as np

from lost_jax.configs import parse_layer_sparsity, parse_layers
from lost_jax.errors import UserError


MODES = ("svd", "oracle", "random")   # random: the ablation of the estimator
ESTIMATOR_TOKENS = ("context", "all")




@dataclasses.dataclass(frozen=True)
class SparsityPlan:
  """Per-layer FFN / attention sparsity (0 = dense, no estimator) and mode; hashable, static."""
  ffn: tuple[float, ...]
  attn: tuple[float, ...]
  mode: str = "svd"
  estimator_tokens: str = "context"   # what the channel scores see: context | all tokens
  block_input_grad: bool = False      # no input gradient through the restricted base paths

  def __post_init__(self):
    object.__setattr__(self, "ffn", tuple(float(s) for s in self.ffn))
    object.__setattr__(self, "attn", tuple(float(s) for s in self.attn))
    if len(self.ffn) != len(self.attn):
      raise ValueError(f"SparsityPlan: {len(self.ffn)} ffn vs {len(self.attn)} attn entries. "
                       "Fix: give one sparsity per layer for both.")
    bad = [s for s in self.ffn + self.attn if not 0.0 <= s < 1.0]
    if bad:
      raise ValueError(f"SparsityPlan: sparsities {bad} are outside [0, 1). "
                       "Fix: use the fraction of channels dropped, e.g. 0.9.")
    if self.mode not in MODES:
      raise ValueError(f"SparsityPlan: mode={self.mode!r} is unknown. Fix: one of {MODES}.")
    if self.estimator_tokens not in ESTIMATOR_TOKENS:
      raise ValueError(f"SparsityPlan: estimator_tokens={self.estimator_tokens!r} is unknown. "
                       f"Fix: one of {ESTIMATOR_TOKENS}.")

  @property
  def n_layers(self) -> int:
    return len(self.ffn)

  @classmethod
  def dense(cls, n_layers: int) -> "SparsityPlan":
    return cls((0.0,) * n_layers, (0.0,) * n_layers)

  @classmethod
  def from_layers(cls, n_layers: int, ffn: float = 0.0, ffn_layers="",
                  attn: float = 0.0, attn_layers="", mode: str = "svd") -> "SparsityPlan":
    """One FFN and one attention sparsity on the listed layers ('13-29' or ints), 0 elsewhere."""
    def per_layer(value, spec):
      layers = set(parse_layers(spec))
      if any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"SparsityPlan: layers {sorted(layers)} exceed 0..{n_layers - 1}.")
      return tuple(value if i in layers else 0.0 for i in range(n_layers))
    return cls(per_layer(ffn, ffn_layers), per_layer(attn, attn_layers), mode)

  def estimator_layers(self) -> tuple[int, ...]:
    """Layers whose FFN or attention is sparse (the only ones needing estimators)."""
    return tuple(i for i in range(self.n_layers) if self.ffn[i] > 0 or self.attn[i] > 0)


def bucket_len(n: int, length: int, bucket: int) -> int:
  """n rounded up to a multiple of bucket, capped at length (static shape buckets)."""
  if bucket < 1:
    raise ValueError(f"bucket={bucket} must be >= 1.")
  return min(length, -(-int(n) // bucket) * bucket)


def dense_suffix_len(loss_mask_BxL: np.ndarray, bucket: int = 64) -> int:
  """Host-side static dense length: covers every position with a loss, bucketed."""
  loss_mask = np.asarray(loss_mask_BxL, bool)
  length = loss_mask.shape[1]
  cols = np.flatnonzero(loss_mask.any(axis=0))
  if cols.size == 0:
    return 0
  return bucket_len(length - int(cols[0]), length, bucket)


class StepLengths(NamedTuple):
  """Static lengths of one fine-tuning step: the dense suffix (its context before it runs
  sparse) and the suffix whose logits are computed (every loss position)."""
  dense_len: int
  logits_len: int


def step_lengths(weights_BxL: np.ndarray, bucket: int, sparse: bool) -> StepLengths:
  """Host-side StepLengths of a batch: suffixes covering every loss position, bucketed.

  sparse=False (dense LoRA, or before SparseLoRA starts) keeps every token dense.
  """
  length = np.shape(weights_BxL)[1]
  logits_len = max(1, dense_suffix_len(weights_BxL, bucket))
  return StepLengths(logits_len if sparse else length, logits_len)


def plan_from_config(sparse_cfg, n_layers: int) -> SparsityPlan:
  """SparsityPlan from a fine-tuning config's `sparse` group ('<fraction>@<layers>;...')."""
  if not sparse_cfg.enabled:
    return SparsityPlan.dense(n_layers)
  return SparsityPlan(parse_layer_sparsity(sparse_cfg.ffn, n_layers, "sparse.ffn"),
                      parse_layer_sparsity(sparse_cfg.attn, n_layers, "sparse.attn"),
                      sparse_cfg.get("mode", "svd"),
                      sparse_cfg.get("estimator_tokens", "context"),
                      bool(sparse_cfg.get("block_input_grad", False)))


PLAN_FORMAT = "lost_jax_sparselora_plan/1"
# What a plan's per-layer channel counts depend on: a plan fits only a model of this shape.
PLAN_SHAPE = ("n_layers", "d_model", "ffn_dim", "n_heads", "n_kv_heads")


def plan_record(plan: SparsityPlan, model_cfg, **info) -> dict:
  """The JSON record of a plan file: per-layer sparsities, the model shape it fits, `info`."""
  return {"format": PLAN_FORMAT, "model": {k: int(model_cfg[k]) for k in PLAN_SHAPE},
          "mode": plan.mode, "ffn": list(plan.ffn), "attn": list(plan.attn), **info}


def read_plan_file(path: str, model_cfg) -> SparsityPlan:
  """The SparsityPlan of a plan file (`calibrate`'s plan.json), refused (UserError) if it
  cannot be read or was calibrated for a model of another shape."""
  fix = ("Fix: calibrate a plan for this base: python -m lost_jax.main calibrate "
         "--config=<the same config> --workdir=DIR, then --config.sparse.plan=DIR/plan.json")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if record.get("format") != PLAN_FORMAT:
      raise ValueError(f"format {record.get('format')!r} is not {PLAN_FORMAT!r}")
    plan = SparsityPlan(record["ffn"], record["attn"], record.get("mode", "svd"))
    shape = {k: int(record["model"][k]) for k in PLAN_SHAPE}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"config.sparse.plan={path}: not a readable plan file "
                    f"({type(e).__name__}: {e}). {fix}") from None
  want = {k: int(model_cfg[k]) for k in PLAN_SHAPE}
  if shape != want:
    diff = ", ".join(f"{k} {shape[k]} (the base: {want[k]})" for k in PLAN_SHAPE
                     if shape[k] != want[k])
    raise UserError(f"config.sparse.plan={path} was calibrated for a model of another shape: "
                    f"{diff}. {fix}")
  return plan
