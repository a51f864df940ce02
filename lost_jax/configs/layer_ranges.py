"""The one layer-range syntax: '13-29,31' (layers) and '0.9@13-29;0.5@31' (a value per range)."""

from __future__ import annotations

from typing import Sequence

from lost_jax.errors import UserError


def parse_layers(spec: str | Sequence[int]) -> tuple[int, ...]:
  """'13-29,31' -> (13, ..., 29, 31); a sequence of ints passes through. ValueError if bad."""
  if not isinstance(spec, str):
    return tuple(int(i) for i in spec)
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    lo, _, hi = part.partition("-")
    out.extend(range(int(lo), int(hi or lo) + 1))
  return tuple(out)


def parse_layer_sparsity(spec: str, n_layers: int | None, field: str) -> tuple[float, ...]:
  """'0.9@13-29;0.5@31' -> per-layer sparsity (0 = dense) for n_layers layers.

  n_layers=None checks only the syntax and values (the model's depth is not known yet).
  """
  out = [0.0] * (n_layers or 0)
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    value, _, layers = part.partition("@")
    try:
      value = float(value)
      idx = parse_layers(layers)
    except ValueError:
      raise UserError(f"config.{field}: cannot parse {part!r}. Fix: write e.g. "
                      "'0.9@13-29;0.5@31'") from None
    if not 0.0 <= value < 1.0:
      raise UserError(f"config.{field}: sparsity {value} is outside [0, 1). Fix: keep a "
                      "fraction of channels < 1")
    if n_layers is None:
      continue
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
      raise UserError(f"config.{field}: layer {bad[0]} does not exist in a {n_layers}-layer "
                      f"model. Fix: use layers 0..{n_layers - 1}")
    for i in idx:
      out[i] = value
  return tuple(out)


def format_layer_sparsity(values: Sequence[float]) -> str:
  """Per-layer sparsity -> '0.9@13-29;0.5@31' (inverse of parse_layer_sparsity; 0 = dense)."""
  parts, i = [], 0
  while i < len(values):
    j = i
    while j + 1 < len(values) and values[j + 1] == values[i]:
      j += 1
    if values[i] > 0:
      parts.append(f"{float(values[i]):g}@{i}" + (f"-{j}" if j > i else ""))
    i = j + 1
  return ";".join(parts)
