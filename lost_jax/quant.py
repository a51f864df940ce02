"""Block-wise quantisation: 8-bit optimizer moments and 4-bit NF4 frozen weights (pure functions).

Both formats split the LAST axis of an array into blocks of `block` values (the tail block is
zero-padded), store one float32 absmax scale per block, and store each value as an index into a
fixed code book of normalised values in [-1, 1] (or [0, 1]):

- 8-bit moments (`quantize_blockwise` with `dynamic_codebook`): uint8 indices, block 256. The
  code book is the dynamic (tree) map of Dettmers et al. 2022 ("8-bit optimizers via block-wise
  quantization"): per code, a decimal exponent e (values 10^-e * fraction) and a linear fraction
  in (0.1, 1] whose resolution shrinks as e grows. It represents values from 1 down to ~1e-7 of
  the block's absmax with bounded *relative* error, which a linear int8 map cannot: there every
  value below absmax/254 rounds to 0.
- NF4 weights (`nf4_quantize`): 4-bit indices into the 16 NormalFloat levels of QLoRA
  (Dettmers et al. 2023, appendix E), block 64; two indices are packed per uint8.

Codes keep the array's own shape (NF4: the last axis halved by packing) and scales have shape
`shape[:-1] + (n_blocks,)`, so both shard on the leading axes exactly like the array they encode.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lost_jax.configs import STATE_BLOCK

NF4_BLOCK = 64           # values per scale for NF4 weights (as QLoRA).

# The 16 NF4 levels (QLoRA appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an exact
# zero; 8 levels on the positive side, 7 on the negative. tests/test_quant.py re-derives them.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def dynamic_codebook(signed: bool) -> np.ndarray:
  """Sorted float32 code book of the 8-bit dynamic map: 255 values (signed) or 256 (unsigned).

  Exponent e = 0..E-1 gets 2^(F-e) fractions 0.1 + 0.9 * j / 2^(F-e), j = 1..2^(F-e), scaled by
  10^-e (F = 6, E = 7 signed, mirrored to negatives; F = 7, E = 8 unsigned: the sign bit becomes
  one more fraction bit), plus an exact 0. The largest code is exactly 1 (a block's absmax).
  """
  frac_bits, n_exp = (6, 7) if signed else (7, 8)
  pos = []
  for e in range(n_exp):
    n = 2 ** (frac_bits - e)
    pos.append(10.0 ** -e * (0.1 + 0.9 * np.arange(1, n + 1) / n))
  pos = np.concatenate(pos)
  values = np.concatenate([-pos, [0.0], pos]) if signed else np.concatenate([[0.0], pos])
  return np.sort(values).astype(np.float32)


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """[..., n] -> [..., ceil(n / block), block], zero-padding the tail block."""
  n = x.shape[-1]
  nb = math.ceil(n / block)
  pad = nb * block - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(*x.shape[:-1], nb, block)


def _nearest(x_norm: jax.Array, codebook: np.ndarray) -> jax.Array:
  """Index of the nearest code-book entry (sorted code book) for every value, as int32."""
  mid = jnp.asarray((codebook[1:] + codebook[:-1]) / 2, jnp.float32)
  return jnp.searchsorted(mid, x_norm.astype(jnp.float32), side="left").astype(jnp.int32)


def quantize_blockwise(x: jax.Array, codebook: np.ndarray, block: int = STATE_BLOCK):
  """x [..., n] -> (codes uint8 [..., n], scales float32 [..., ceil(n / block)]).

  Each block is divided by its absmax (scale; 1 for an all-zero block) and every value is
  replaced by the index of the nearest code-book value.
  """
  n = x.shape[-1]
  xb = _blocks(x.astype(jnp.float32), block)
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  scales = jnp.where(absmax > 0, absmax, 1.0)
  codes = _nearest(xb / scales[..., None], codebook).astype(jnp.uint8)
  codes = codes.reshape(*x.shape[:-1], -1)[..., :n]
  return codes, scales


def dequantize_blockwise(codes: jax.Array, scales: jax.Array, codebook: np.ndarray,
                         block: int = STATE_BLOCK) -> jax.Array:
  """(codes uint8 [..., n], scales float32 [..., nb]) -> float32 [..., n]."""
  n = codes.shape[-1]
  values = jnp.asarray(codebook, jnp.float32)[codes.astype(jnp.int32)]
  vb = _blocks(values, block) * scales[..., None]
  return vb.reshape(*codes.shape[:-1], -1)[..., :n]
