"""The batch every data pipeline yields and every step reads: int32 / float32 [B, L] arrays."""

# inputs / targets: token ids (targets = inputs shifted by one), positions: RoPE positions,
# segment_ids: packed-document ids (0 = padding), weights: 1.0 where a target has a loss.
KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
