"""The GGUF container: metadata as Python values, tensors memory-mapped and dequantised.

The `gguf` package's GGUFReader builds a NumPy view per array element while opening a file,
which takes tens of seconds for a 262k-token vocabulary; this parser decodes strings once and
reads numeric arrays as one NumPy array each. Dequantisation is the `gguf` package's.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian files only).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format (little-endian), also NumPy's dtype code
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_DEFAULT_ALIGNMENT = 32


class Tensor(NamedTuple):
  """A tensor's entry: ggml type (gguf.GGMLQuantizationType), shape as ggml lists it
  (innermost first) and the byte range of its data in the file."""
  name: str
  ggml_type: int
  ggml_shape: tuple[int, ...]
  start: int
  n_bytes: int


class GGUFFile:
  """One GGUF file: `fields` (key -> str / int / float / bool / list of str / NumPy array) and
  `tensors` (name -> Tensor, file order). Raises ValueError / struct.error / IndexError for a
  file that is not GGUF or is cut short."""

  def __init__(self, path: str):
    import gguf  # pylint: disable=g-import-not-at-top
    self.path = path
    self._map = np.memmap(path, np.uint8, mode="r")
    if bytes(self._map[:4]) != _MAGIC:
      raise ValueError("no GGUF magic number")
    self._pos = 4
    version = self._scalar(4)
    if version not in (2, 3):
      raise ValueError(f"GGUF version {version} (big-endian or unknown)")
    n_tensors, n_fields = self._scalar(10), self._scalar(10)
    self.fields: dict[str, Any] = {}
    for _ in range(n_fields):
      key = self._string()
      self.fields[key] = self._value(self._scalar(4))
    infos = []
    for _ in range(n_tensors):
      name = self._string()
      dims = tuple(int(self._scalar(10)) for _ in range(self._scalar(4)))
      infos.append((name, dims, int(self._scalar(4)), int(self._scalar(10))))
    align = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-self._pos // align) * align
    self.tensors: dict[str, Tensor] = {}
    for name, dims, kind, offset in infos:
      block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
      n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_bytes
      start = data_start + offset
      if start + n_bytes > len(self._map):
        raise IndexError(f"tensor {name!r} ends at byte {start + n_bytes} but the file has "
                         f"{len(self._map)}")
      self.tensors[name] = Tensor(name, kind, dims, start, n_bytes)

  def _scalar(self, kind: int):
    fmt = _SCALARS[kind]
    (x,) = struct.unpack_from(fmt, self._map, self._pos)
    self._pos += struct.calcsize(fmt)
    return x

  def _string(self) -> str:
    n = self._scalar(10)
    text = bytes(self._map[self._pos:self._pos + n]).decode("utf-8")
    self._pos += n
    return text

  def _value(self, kind: int):
    if kind == _STRING:
      return self._string()
    if kind != _ARRAY:
      return self._scalar(kind)
    item, count = self._scalar(4), self._scalar(10)
    if item == _STRING:
      return [self._string() for _ in range(count)]
    if item == _ARRAY:
      return [self._value(self._scalar(4)) for _ in range(count)]
    dtype = np.dtype(_SCALARS[item])
    out = np.frombuffer(self._map, dtype, count, self._pos)
    self._pos += dtype.itemsize * count
    return out

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` dequantised to float32, in row-major order (ggml's dims reversed)."""
    import gguf  # pylint: disable=g-import-not-at-top
    t = self.tensors[name]
    shape = tuple(reversed(t.ggml_shape))
    raw = self._map[t.start:t.start + t.n_bytes]
    kind = gguf.GGMLQuantizationType(t.ggml_type)
    rows = raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, kind))
    return np.array(gguf.quants.dequantize(rows, kind), np.float32).reshape(shape)
