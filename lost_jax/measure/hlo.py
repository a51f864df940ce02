"""Per-step costs of a compiled XLA module read from its HLO text, loops counted by trip count.

`compiled.cost_analysis()` adds a while loop's body once, whatever its trip count: a step with
gradient accumulation (a scan over micro-batches) and a scanned layer stack (a scan over the
layers, forward and backward) is under-counted by the product of the trip counts. `step_costs`
walks the module's call graph instead: each while body is weighted by its trip count (read
from the loop's condition and initial counter), each conditional by its costliest branch.

Per instruction it counts
- FLOPs of every dot / convolution, fused or not: 2 x output elements x contracted size;
- bytes of every instruction outside fusions that reads or writes memory: its operands plus
  its result (a fusion counts at its boundary, as XLA's cost analysis does);
- collectives: count and bytes per kind. all-gather: the gathered result; all-reduce,
  reduce-scatter, all-to-all, collective-permute: the operand. The TPU compiler emits a
  reduce-scatter as an all-reduce inside a fusion named all-reduce-scatter*; that one is
  counted as a reduce-scatter. `ici_bytes` is what a ring moves per chip over n chips:
  (n - 1) / n of the bytes (all-gather, reduce-scatter, all-to-all), twice that (all-reduce),
  all of them (collective-permute).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

# Bytes per element of HLO primitive types (sub-byte types rounded up to a byte).
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Ring traffic per chip as a fraction of the bytes, for a group of n chips.
_RING = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
         "all-to-all": lambda n: (n - 1) / n, "all-reduce": lambda n: 2 * (n - 1) / n,
         "collective-permute": lambda n: 1.0}
# Opcodes that move no data of their own (their bodies, if any, are walked).
_NO_BYTES = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
             "conditional", "call", "after-all", "partition-id", "replica-id", "iota",
             "copy-done", "slice-done", "all-gather-done", "all-reduce-done",
             "collective-permute-done",
             "async-done", "async-update", "opt-barrier", "add-dependency"}

# TPU compiler custom calls that move no data: a buffer allocation, a concatenation of
# adjacent buffers by bitcast.
_FREE_CALLS = ("AllocateBuffer", "ConcatBitcast")

_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class Instr:
  """One HLO instruction: result type text, opcode, operand names, the text inside the opcode's
  parentheses (a constant's value) and the attribute text after them."""
  name: str
  type: str
  opcode: str
  operands: tuple[str, ...]
  args: str
  attrs: str
  root: bool = False


@dataclasses.dataclass
class Costs:
  """Summed costs: FLOPs, bytes, and per collective kind its count, bytes and ring bytes."""
  flops: float = 0.0
  bytes: float = 0.0
  count: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(COLLECTIVES, 0.0))
  coll_bytes: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(COLLECTIVES, 0.0))
  ici_bytes: float = 0.0
  seconds: float = 0.0       # sum over instructions of max(FLOPs / peak, bytes / bandwidth)
  # All-reduces of a zero array with one shard written in: an all-gather done as an
  # all-reduce (the TPU compiler's choice for some FSDP gathers); part of count / coll_bytes.
  padded_gathers: float = 0.0
  padded_gather_bytes: float = 0.0
  unknown_loops: int = 0     # while loops whose trip count could not be read (counted once)

  def add(self, other: "Costs", times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.bytes += times * other.bytes
    self.ici_bytes += times * other.ici_bytes
    self.seconds += times * other.seconds
    self.padded_gathers += times * other.padded_gathers
    self.padded_gather_bytes += times * other.padded_gather_bytes
    for k in COLLECTIVES:
      self.count[k] += times * other.count[k]
      self.coll_bytes[k] += times * other.coll_bytes[k]
    self.unknown_loops += other.unknown_loops

  def as_dict(self) -> dict:
    return dict(flops=self.flops, bytes=self.bytes, ici_bytes=self.ici_bytes,
                seconds=self.seconds, padded_gathers=self.padded_gathers,
                padded_gather_bytes=self.padded_gather_bytes,
                collective_count=dict(self.count),
                collective_bytes=dict(self.coll_bytes), unknown_loops=self.unknown_loops)


def type_bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (a tuple sums its elements); layouts ignored."""
  return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
             for d, dims in _ARRAY.findall(type_text))


def type_dims(type_text: str) -> list[int]:
  """Dimensions of the first array in an HLO type."""
  m = _ARRAY.search(type_text)
  return [int(x) for x in m.group(2).split(",") if x] if m else []


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes text[start] ('(', '{' or '[')."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


def parse_instr(line: str) -> Instr | None:
  """An Instr from one instruction line of HLO text, or None for anything else."""
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(2), m.group(3)
  end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
  if end <= 0:
    return None
  type_text, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren <= 0:
    return None
  opcode = rest[:paren]
  close = _closing(rest, paren)
  args = rest[paren + 1:close - 1]
  return Instr(name, type_text, opcode, tuple(re.findall(r"%([\w.\-]+)", args)), args,
               rest[close:], bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """({computation name: its instructions}, entry computation name) of an HLO module's text."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith("HloModule"):
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    instr = parse_instr(line)
    if instr is not None:
      comps[current].append(instr)
  return comps, entry


def _attr(attrs: str, key: str) -> str:
  """The value text of `key=` in an attribute string ('' if absent), brackets balanced."""
  m = re.search(r"\b" + re.escape(key) + r"=", attrs)
  if not m:
    return ""
  i = m.end()
  if i < len(attrs) and attrs[i] in "({[":
    return attrs[i:_closing(attrs, i)]
  j = i
  while j < len(attrs) and attrs[j] not in ", ":
    j += 1
  return attrs[i:j]


def _ints(text: str) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", text)]


def dot_flops(instr: Instr, types: dict[str, str]) -> float:
  """2 x output elements x contracted elements of a dot or convolution (0 for other ops)."""
  out = math.prod(type_dims(instr.type))
  if instr.opcode == "dot":
    lhs = type_dims(types.get(instr.operands[0], ""))
    contracted = math.prod(lhs[i] for i in _ints(_attr(instr.attrs, "lhs_contracting_dims")))
    return 2.0 * out * contracted
  if instr.opcode == "convolution":
    return _conv_flops(instr, types, out)
  return 0.0


def _window(attrs: str) -> dict[str, list[list[int]]]:
  """window={size=4x1 stride=.. pad=3_3x0_0 lhs_dilate=.. rhs_dilate=..} as lists per dim."""
  text = _attr(attrs, "window").strip("{}")
  out = {}
  for item in text.split():
    key, _, value = item.partition("=")
    out[key] = [[int(v) for v in dim.split("_")] for dim in value.split("x")] if value else []
  return out


def _conv_flops(instr: Instr, types: dict[str, str], out_elems: int) -> float:
  """2 x multiply-adds of a convolution: per output feature element, the kernel's input
  features x the (output position, window position) pairs that land inside the unpadded
  input along each spatial dim (a weight-gradient 'convolution' pads heavily)."""
  labels = _attr(instr.attrs, "dim_labels")          # e.g. fb0_0oi->0fb
  lhs_l, rest = labels.split("_", 1)
  rhs_l, out_l = rest.split("->")
  lhs = type_dims(types.get(instr.operands[0], ""))
  rhs = type_dims(types.get(instr.operands[1], ""))
  out = type_dims(instr.type)
  in_features = rhs[rhs_l.index("i")]
  spatial = sorted(c for c in rhs_l if c.isdigit())
  win = _window(instr.attrs)
  pairs = 1
  for n, d in enumerate(spatial):
    size_in, k, size_out = lhs[lhs_l.index(d)], rhs[rhs_l.index(d)], out[out_l.index(d)]
    get = lambda key, default: win[key][n] if key in win and n < len(win[key]) else default
    stride, (lo, _), ldil, rdil = (get("stride", [1])[0], get("pad", [0, 0]),
                                   get("lhs_dilate", [1])[0], get("rhs_dilate", [1])[0])
    span = (size_in - 1) * ldil + 1                      # the input after lhs dilation
    pairs *= sum(1 for o in range(size_out) for j in range(k)
                 if 0 <= o * stride + j * rdil - lo < span
                 and (o * stride + j * rdil - lo) % ldil == 0)
  spatial_out = math.prod(out[out_l.index(d)] for d in spatial)
  return 2.0 * out_elems / max(spatial_out, 1) * in_features * pairs


def group_size(attrs: str, num_devices: int) -> int:
  """Chips per replica group of a collective ({{0,1},..}, [a,b]<=[n], or mesh[...] {axes})."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if mesh:                                 # mesh['a'=4,'b'=2] {'a'}: the named axes
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
  groups = _attr(attrs, "replica_groups")
  if not groups or groups in ("{}", "{{}}"):
    return num_devices
  if groups.startswith("{{"):
    return len(_ints(groups[1:_closing(groups, 1)]))
  if groups.startswith("["):               # iota form [groups, size]<=[n]
    return _ints(groups[:groups.find("]")])[-1]
  return num_devices


_PASS = ("bitcast", "copy", "copy-done")


def padded_shard(name: str, instrs: dict[str, Instr], comps: dict[str, list[Instr]]) -> bool:
  """Whether `name` is a zero array (broadcast / constant) with one slice written into it by
  a dynamic-update-slice, unfused or the root of a fusion: a shard padded to the full shape."""
  def zeros(n: str, table: dict[str, Instr]) -> bool:
    ins = table.get(n)
    while ins is not None and ins.opcode in _PASS and ins.operands:
      ins = table.get(ins.operands[0])
    return ins is not None and ins.opcode in ("broadcast", "constant")
  ins = instrs.get(name)
  while ins is not None and ins.opcode in _PASS and ins.operands:
    ins = instrs.get(ins.operands[0])
  if ins is None:
    return False
  if ins.opcode == "dynamic-update-slice":
    return zeros(ins.operands[0], instrs)
  if ins.opcode != "fusion":
    return False
  body = comps.get(_attr(ins.attrs, "calls").lstrip("%"), [])
  table = {i.name: i for i in body}
  root = next((i for i in body if i.root), None)
  if root is None or root.opcode != "dynamic-update-slice":
    return False
  base = table.get(root.operands[0])
  if base is not None and base.opcode == "parameter":
    k = int(base.args)
    return k < len(ins.operands) and zeros(ins.operands[k], instrs)
  return zeros(root.operands[0], table)


def _kind(opcode: str) -> str | None:
  base = opcode[:-6] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def trip_count(cond: list[Instr], init: dict[str, Instr], init_tuple: Instr | None
               ) -> int | None:
  """Trip count of a while loop `i = c0; while i < N: i += 1` from its condition computation
  (ROOT compare(get-tuple-element(param, k), constant(N)), direction=LT) and the k-th operand
  of the loop's initial tuple (a constant, maybe through a copy); None if not of that form."""
  by_name = {i.name: i for i in cond}
  root = next((i for i in cond if i.root), cond[-1] if cond else None)
  if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
    return None
  counter, limit = (by_name.get(n) for n in root.operands[:2])
  if counter is None or limit is None or counter.opcode != "get-tuple-element" or \
     limit.opcode != "constant":
    return None
  index = _ints(_attr(counter.attrs, "index"))
  if not index or init_tuple is None or init_tuple.opcode != "tuple":
    return None
  start = init.get(init_tuple.operands[index[0]])
  while start is not None and start.opcode == "copy":
    start = init.get(start.operands[0])
  if start is None or start.opcode != "constant":
    return None
  try:
    return max(0, int(limit.args) - int(start.args))
  except ValueError:
    return None


def _slice_reads(param: str, body: list[Instr]) -> int | None:
  """Bytes a fused computation reads of its parameter `param` when it only slices it (the
  slices' sizes) or only updates it in place (0); None when some use reads all of it."""
  total = 0
  for ins in body:
    if param not in ins.operands:
      continue
    if ins.opcode in ("dynamic-slice", "slice") and ins.operands[0] == param:
      total += type_bytes(ins.type)
    elif ins.opcode == "dynamic-update-slice" and ins.operands[0] == param:
      continue
    else:
      return None
  return total


def _instr_bytes(ins: Instr, types: dict[str, str], comps: dict[str, list[Instr]]) -> int:
  """Bytes an instruction outside fusions reads and writes, as XLA's cost analysis counts
  them: a (dynamic-)slice reads only its slice, a dynamic-update-slice reads and writes only
  its update (the buffer is updated in place), and a fusion reads of each operand only what
  its body slices and writes only the updates of an in-place root."""
  result = type_bytes(ins.type)
  operand = [type_bytes(types.get(o, "")) for o in ins.operands]
  if ins.opcode == "custom-call" and any(f'"{t}"' in ins.attrs for t in _FREE_CALLS):
    return 0
  if ins.opcode == "slice-start":          # ((operand), slice, context): reads the slice
    return 2 * (result - sum(operand))
  if ins.opcode.endswith("-start"):        # async copy / collective: its tuple holds both ends
    return result if ins.type.startswith("(") else result + sum(operand)
  if ins.opcode in ("dynamic-slice", "slice"):
    return 2 * result
  if ins.opcode == "dynamic-update-slice":
    return 2 * operand[1]
  if ins.opcode != "fusion":
    return result + sum(operand)
  body = comps.get(_attr(ins.attrs, "calls").lstrip("%"), [])
  params = {}
  for i in body:
    if i.opcode == "parameter":
      params[int(i.args)] = i.name
  reads = 0
  for k, size in enumerate(operand):
    sliced = _slice_reads(params[k], body) if k in params else None
    reads += size if sliced is None else sliced
  root = next((i for i in body if i.root), body[-1] if body else None)
  roots = ([next((i for i in body if i.name == n), None) for n in root.operands]
           if root is not None and root.opcode == "tuple" else [root])
  writes = 0
  for r in roots:
    if r is None:
      continue
    if r.opcode == "dynamic-update-slice":
      writes += type_bytes(next((i.type for i in body if i.name == r.operands[1]), ""))
    else:
      writes += type_bytes(r.type)
  return reads + (writes if roots != [None] else result)


def step_costs(hlo_text: str, num_devices: int, flops_per_s: float = 1.0,
               bytes_per_s: float = 1.0) -> tuple[Costs, Costs]:
  """(costs with loop bodies x trip count, costs with every body once) of a compiled module.

  `seconds` is a per-instruction roofline: each instruction outside fusions (a fusion with
  the FLOPs of the dots inside it) takes max(FLOPs / flops_per_s, bytes / bytes_per_s).
  """
  comps, entry = parse_module(hlo_text)
  types = {c: {i.name: i.type for i in instrs} for c, instrs in comps.items()}
  by_name = {c: {i.name: i for i in instrs} for c, instrs in comps.items()}

  @functools.lru_cache(maxsize=None)
  def walk(comp: str, fused: bool, weighted: bool) -> Costs:
    out = Costs()
    rs_fusion = comp.startswith("all-reduce-scatter")
    for ins in comps.get(comp, []):
      flops = dot_flops(ins, types[comp])
      kind = _kind(ins.opcode)
      if kind == "all-reduce" and rs_fusion:
        kind = "reduce-scatter"
      if kind is not None:
        operands = sum(type_bytes(types[comp].get(o, "")) for o in ins.operands)
        if kind == "all-gather":
          size = type_bytes(ins.type) - (operands if ins.opcode.endswith("-start") else 0)
        else:
          size = operands
        n = 2 if kind == "collective-permute" else group_size(ins.attrs, num_devices)
        out.count[kind] += 1
        out.coll_bytes[kind] += size
        if kind == "all-reduce":
          padded = [o for o in ins.operands if padded_shard(o, by_name[comp], comps)]
          out.padded_gathers += bool(padded)
          out.padded_gather_bytes += sum(type_bytes(types[comp].get(o, "")) for o in padded)
        out.ici_bytes += size * _RING[kind](n) if n > 1 else 0.0
      if ins.opcode == "while":
        body = _attr(ins.attrs, "body").lstrip("%")
        cond = _attr(ins.attrs, "condition").lstrip("%")
        trips = trip_count(comps.get(cond, []), by_name[comp],
                           by_name[comp].get(ins.operands[0]) if ins.operands else None)
        if trips is None:
          out.unknown_loops += 1
          trips = 1
        out.add(walk(body, False, weighted), trips if weighted else 1)
      elif ins.opcode == "conditional":
        names = re.findall(r"%([\w.\-]+)", _attr(ins.attrs, "branch_computations")
                           + _attr(ins.attrs, "true_computation")
                           + _attr(ins.attrs, "false_computation"))
        branches = [walk(b, False, weighted) for b in names if b in comps]
        if branches:
          out.add(max(branches, key=lambda c: (c.flops, c.bytes)))
      else:
        called = _attr(ins.attrs, "calls") or _attr(ins.attrs, "called_computations")
        inner_fused = fused or ins.opcode == "fusion"
        for callee in re.findall(r"%?([\w.\-]+)", called):
          if callee in comps:
            sub = walk(callee, inner_fused, weighted)
            out.add(sub)
            if inner_fused and not fused:
              flops += sub.flops     # the fusion's dots, timed with the fusion below
      out.flops += dot_flops(ins, types[comp])
      if not fused and ins.opcode not in _NO_BYTES:
        size = _instr_bytes(ins, types[comp], comps)
        out.bytes += size
        out.seconds += max(flops / flops_per_s, size / bytes_per_s)
    return out

  return walk(entry, False, True), walk(entry, False, False)
