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

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lost_jax.ops.select import take_cols

NF4_BLOCK = 64           # values per scale for NF4 weights (as QLoRA).

# The 16 NF4 levels (QLoRA appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an exact
# zero; 8 levels on the positive side, 7 on the negative. tests/test_quant.py re-derives them.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

STATE_BLOCK = 256        # 8-bit optimizer moments: values per float32 scale (as bitsandbytes).


def _dynamic_layout(signed: bool) -> tuple[int, int]:
  """(fraction bits F, decades E) of the 8-bit dynamic map."""
  return (6, 7) if signed else (7, 8)


def dynamic_codebook(signed: bool) -> np.ndarray:
  """Sorted float32 code book of the 8-bit dynamic map: 255 values (signed) or 256 (unsigned).

  Decade e = 0..E-1 gets 2^(F-e) fractions 0.1 + 0.9 * j / 2^(F-e), j = 1..2^(F-e), scaled by
  10^-e (F = 6, E = 7 signed, mirrored to negatives; F = 7, E = 8 unsigned: the sign bit becomes
  one more fraction bit), plus an exact 0. The largest code is exactly 1 (a block's absmax).
  """
  frac_bits, n_exp = _dynamic_layout(signed)
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


def _dynamic_index(y: jax.Array, signed: bool) -> jax.Array:
  """Nearest `dynamic_codebook(signed)` index of every y in [-1, 1], elementwise (int32).

  Arithmetic instead of a search, so XLA fuses it into one loop with no per-value workspace
  (a binary search keeps ~24 bytes per value alive). The decade e is found by comparing |y|
  with 10^-k; inside a decade the codes are evenly spaced, so rounding the fraction is the
  nearest code (j = 0 is the next decade's top code, the same value). Below half the smallest
  code, 0.
  """
  frac_bits, n_exp = _dynamic_layout(signed)
  a = jnp.abs(y).astype(jnp.float32)
  e = sum((a <= np.float32(10.0 ** -k)).astype(jnp.int32) for k in range(1, n_exp))
  n = jnp.left_shift(1, frac_bits - e)                              # codes in decade e
  f = a * jnp.power(np.float32(10.0), e.astype(jnp.float32))        # in (0.1, 1]
  j = jnp.clip(jnp.round((f - 0.1) / 0.9 * n.astype(jnp.float32)).astype(jnp.int32), 0, n)
  # Codes below decade e: sum over e' > e of 2^(F-e') = 2^(F-e) - 2^(F-E+1).
  pos = n - 2 ** (frac_bits - n_exp + 1) + j - 1                    # -1 only below the book
  smallest = 10.0 ** -(n_exp - 1) * (0.1 + 0.9 / 2 ** (frac_bits - n_exp + 1))
  pos = jnp.where(a < np.float32(smallest / 2), -1, jnp.maximum(pos, 0))
  if not signed:
    return pos + 1
  zero = 2 ** (frac_bits + 1) - 1                                   # index of 0.0 (127)
  return jnp.where(y < 0, zero - 1 - pos, zero + 1 + pos)


def _dynamic_value(index: jax.Array, signed: bool) -> jax.Array:
  """`dynamic_codebook(signed)[index]`, elementwise (inverse of `_dynamic_index`; float32).

  Arithmetic rather than a table lookup, so XLA fuses it into its consumer (XLA:CPU
  materialises a gather's result)."""
  frac_bits, n_exp = _dynamic_layout(signed)
  zero = 2 ** (frac_bits + 1) - 1 if signed else 0
  pos = jnp.abs(index - zero) - 1                                   # -1 for the zero code
  low = 2 ** (frac_bits - n_exp + 1)
  width = 32 - jax.lax.clz(jnp.maximum(pos, 0) + low)               # bit length = F - e + 1
  e = frac_bits + 1 - width
  n = jnp.left_shift(1, frac_bits - e)
  j = pos - (n - low) + 1
  mag = (0.1 + 0.9 * j.astype(jnp.float32) / n.astype(jnp.float32)) * jnp.power(
      np.float32(0.1), e.astype(jnp.float32))
  value = jnp.where(pos < 0, 0.0, mag)
  return jnp.where(index < zero, -value, value) if signed else value


def quantize_blockwise(x: jax.Array, signed: bool, block: int = STATE_BLOCK):
  """x [..., n] -> (codes uint8 [..., n], scales float32 [..., ceil(n / block)]).

  Each block is divided by its absmax (scale; 1 for an all-zero block) and every value is
  replaced by the index of the nearest value of `dynamic_codebook(signed)` (signed=False
  needs x >= 0).
  """
  scales = block_scales(x, block)
  return block_codes(x, scales, signed, block), scales


def block_scales(x: jax.Array, block: int = STATE_BLOCK) -> jax.Array:
  """Absmax of every block of the last axis (1 for an all-zero block), float32 [..., nb]."""
  absmax = jnp.max(jnp.abs(_blocks(x.astype(jnp.float32), block)), axis=-1)
  return jnp.where(absmax > 0, absmax, 1.0)


def block_codes(x: jax.Array, scales: jax.Array, signed: bool, block: int = STATE_BLOCK
                ) -> jax.Array:
  """uint8 dynamic-map codes [..., n] of x [..., n] under the block scales [..., nb]."""
  n = x.shape[-1]
  xb = _blocks(x.astype(jnp.float32), block)
  codes = _dynamic_index(xb / scales[..., None], signed).astype(jnp.uint8)
  return codes.reshape(*x.shape[:-1], -1)[..., :n]


def dequantize_blockwise(codes: jax.Array, scales: jax.Array, signed: bool,
                         block: int = STATE_BLOCK) -> jax.Array:
  """(codes uint8 [..., n], scales float32 [..., nb]) -> float32 [..., n]."""
  n = codes.shape[-1]
  vb = _blocks(_dynamic_value(codes.astype(jnp.int32), signed), block) * scales[..., None]
  return vb.reshape(*codes.shape[:-1], -1)[..., :n]


def nf4_quantize(w_NxM: jax.Array, block: int = NF4_BLOCK):
  """w [n, m] -> (codes uint8 [n, nb * block / 2], two NF4 indices per byte, low nibble first;
  scales float32 [n, nb]), nb = ceil(m / block); the tail block is zero-padded."""
  wb = _blocks(w_NxM.astype(jnp.float32), block)
  absmax = jnp.max(jnp.abs(wb), axis=-1)
  scales = jnp.where(absmax > 0, absmax, 1.0)
  idx = _nearest(wb / scales[..., None], NF4_LEVELS).reshape(w_NxM.shape[0], -1)
  codes = (idx[:, 0::2] | (idx[:, 1::2] << 4)).astype(jnp.uint8)
  return codes, scales


def nf4_unpack(codes: jax.Array) -> jax.Array:
  """Packed uint8 [..., p] -> NF4 indices int32 [..., 2p]."""
  c = codes.astype(jnp.int32)
  return jnp.stack([c & 15, c >> 4], axis=-1).reshape(*codes.shape[:-1], -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Weight:
  """A frozen kernel [n, m] in NF4: `kernel[...]` (an nnx.Param holding this) dequantises it.

  codes uint8 [n, nb * block / 2] and scales float32 [n, nb] are the pytree leaves (both shard
  on n like the kernel); m, dtype (of the dequantised kernel) and block are static.
  """
  codes: jax.Array
  scales: jax.Array
  m: int = dataclasses.field(metadata=dict(static=True))
  dtype: str = dataclasses.field(metadata=dict(static=True))
  block: int = dataclasses.field(default=NF4_BLOCK, metadata=dict(static=True))

  @classmethod
  def from_kernel(cls, w_NxM: jax.Array, block: int = NF4_BLOCK) -> "NF4Weight":
    codes, scales = nf4_quantize(w_NxM, block)
    return cls(codes, scales, w_NxM.shape[1], jnp.dtype(w_NxM.dtype).name, block)

  @property
  def shape(self) -> tuple[int, int]:
    return (self.codes.shape[0], self.m)

  @property
  def ndim(self) -> int:
    return 2

  def dequantize(self) -> jax.Array:
    """The whole kernel [n, m] in `dtype`."""
    levels = jnp.asarray(NF4_LEVELS)[nf4_unpack(self.codes)]
    w = levels.reshape(*self.scales.shape, self.block) * self.scales[..., None]
    return w.reshape(self.codes.shape[0], -1)[:, :self.m].astype(self.dtype)

  def __getitem__(self, index) -> jax.Array:
    return self.dequantize()[index]

  def take_cols(self, idx_K: jax.Array) -> jax.Array:
    """kernel[:, idx] [n, K], dequantising only those columns."""
    nib = (self.codes[:, idx_K // 2].astype(jnp.int32) >> (4 * (idx_K % 2))) & 15
    w = jnp.asarray(NF4_LEVELS)[nib] * self.scales[:, idx_K // self.block]
    return w.astype(self.dtype)

  def take_rows(self, idx_K: jax.Array) -> jax.Array:
    """kernel[idx, :] [K, m], dequantising only those rows."""
    sub = NF4Weight(self.codes[idx_K], self.scales[idx_K], self.m, self.dtype, self.block)
    return sub.dequantize()


def with_dequantized(fn, x: jax.Array, w: "NF4Weight") -> jax.Array:
  """fn(x, w.dequantize()) for a frozen kernel: dequantised where the layer runs, and again in
  the backward pass where the layer's cotangent arrives, never kept.

  Left to autodiff and XLA, the dequantised kernel is a residual of its matmul and is
  computed up front: every layer's stays alive through the step, and a 4-bit base needs more
  training memory than a bf16 one. Here the residuals are x, codes and scales, the forward
  dequantises after x exists and the backward after the cotangent does (`after`), so the two
  are different computations XLA cannot merge. No gradient reaches codes or scales.
  """
  def kernel(codes, scales):
    return NF4Weight(codes, scales, w.m, w.dtype, w.block).dequantize()

  def after(a, codes, scales):
    # + 0 * a[0]: the same codes and scales for finite a, but XLA then dequantises this
    # layer's kernel only once `a` exists. Otherwise it schedules the dequantisation (a
    # computation of arguments alone) up front, and all layers' kernels are alive at once;
    # optimisation barriers do not survive XLA:CPU's pipeline.
    zero = a.reshape(-1)[0].astype(jnp.float32) * 0
    return codes + zero.astype(codes.dtype), scales + zero

  @jax.custom_vjp
  def region(x, codes, scales):
    return fn(x, kernel(*after(x, codes, scales)))

  def fwd(x, codes, scales):
    return region(x, codes, scales), (x, codes, scales)

  def bwd(res, dy):
    x, codes, scales = res
    _, vjp = jax.vjp(lambda x: fn(x, kernel(*after(dy, codes, scales))), x)
    return (*vjp(dy), np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scales))

  region.defvjp(fwd, bwd)
  return region(x, w.codes, w.scales)


def as_nf4(kernel) -> NF4Weight:
  """A kernel [n, m] as an NF4Weight (itself when it already is one)."""
  return kernel if isinstance(kernel, NF4Weight) else NF4Weight.from_kernel(kernel)


def with_kernel(fn, x: jax.Array, kernel) -> jax.Array:
  """fn(x, kernel) for a plain kernel array; for an NF4Weight, `with_dequantized`."""
  if isinstance(kernel, NF4Weight):
    return with_dequantized(fn, x, kernel)
  return fn(x, kernel)


def kernel_cols(kernel, idx_K: jax.Array, dtype=None) -> jax.Array:
  """kernel[:, idx] [n, K] in dtype (None: the kernel's); NF4 dequantises only those columns."""
  if isinstance(kernel, NF4Weight):
    return kernel.take_cols(idx_K).astype(dtype or kernel.dtype)
  return take_cols(kernel if dtype is None else kernel.astype(dtype), idx_K)


def kernel_rows(kernel, idx_K: jax.Array, dtype=None) -> jax.Array:
  """kernel[idx, :] [K, m] in dtype (None: the kernel's); NF4 dequantises only those rows."""
  if isinstance(kernel, NF4Weight):
    return kernel.take_rows(idx_K).astype(dtype or kernel.dtype)
  k = kernel if dtype is None else kernel.astype(dtype)
  return jnp.take(k, idx_K, axis=0, mode="clip", unique_indices=True, indices_are_sorted=True)


def nf4_bytes(n: int, m: int, block: int = NF4_BLOCK) -> int:
  """Bytes of an NF4 kernel [n, m]: half a byte per (padded) value + a float32 scale per block."""
  nb = math.ceil(m / block)
  return n * nb * (block // 2 + 4)
