"""The language-model loss both recipes train with: summed next-token NLL of a batch."""

from __future__ import annotations

from lost_jax.ops import losses
from lost_jax.training import optim


def next_token_nll(model, batch: dict, *model_args):
  """(summed token NLL, weight sum) of `batch` (float32 scalars).

  `model_args` go to the model before positions (SparseLoRA's `StepLengths`). A model may
  return the last positions only (every position with a loss): targets and weights are cut
  to match. With model.perf.loss_chunk > 0 the LM head and the loss are fused
  (`losses.fused_cross_entropy`): no [tokens, vocab] logits.
  """
  perf = model.cfg.perf
  chunk = perf.get("loss_chunk", 0)
  out = model(batch["inputs"], *model_args, batch["positions"], batch["segment_ids"],
              head=not chunk)
  n = out.shape[1]
  targets, weights = batch["targets"][:, -n:], batch["weights"][:, -n:]
  if not chunk:
    return optim.cross_entropy(out, targets, weights)
  return losses.fused_cross_entropy(out, model.lm_head.kernel[...], targets, weights,
                                    chunk=chunk, vocab_chunk=perf.get("loss_vocab_chunk", 0),
                                    dtype=out.dtype, backward=perf.matmul_backward)
