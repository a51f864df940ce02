"""Device mesh and the one rule table mapping logical parameter axes to mesh axes."""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lost_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Unlisted ones ('rank', 'norm', None) are not sharded by name, but
# `plan_spec` gives FSDP a dim of every array that is not tiny.
RULES = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
}
BATCH = ("data", "fsdp")
# Arrays smaller than this (norm scales, LOST's values at small widths) may stay replicated.
MIN_FSDP_SIZE = 2 ** 10


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolve (data, fsdp, tensor) with at most one -1 (fill) against the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive with "
                    "at most one -1 (fill). Fix: e.g. --config.mesh.data=-1 "
                    "--config.mesh.fsdp=1 --config.mesh.tensor=1.")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise UserError(f"config.mesh={dict(zip(MESH_AXES, sizes))} needs a multiple of {known} "
                    f"devices but {num_devices} are present. Fix: choose mesh sizes whose "
                    f"product divides {num_devices}.")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise UserError(f"config.mesh={dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of "
                    f"{num_devices} devices. Fix: make the product equal the device count, or "
                    "set one axis to -1.")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices, with Auto axes for jit."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes, shape, mesh: jax.sharding.Mesh) -> P:
  """PartitionSpec for a parameter (see `plan_spec`)."""
  return plan_spec(axes, shape, mesh)[0]


@dataclasses.dataclass(frozen=True)
class Unsplit:
  """An array that stays whole over a mesh axis: the axis divides none of its dims."""
  name: str
  shape: tuple[int, ...]
  axis: str
  size: int          # the mesh axis's size
  nbytes: int = 0    # 0: dtype unknown


def plan_spec(axes, shape, mesh: jax.sharding.Mesh, name: str = "",
              complete_fsdp: bool = True, dtype=None) -> tuple[P, list[Unsplit]]:
  """PartitionSpec for a parameter of logical `axes`, and the mesh axes it could not use.

  Each logical axis takes its RULES mesh axis where that axis divides the dim. Then, unless
  the array is tiny (< MIN_FSDP_SIZE elements) or `complete_fsdp` is False (a layout inside
  the step), every mesh axis above 1 that the rules asked for but could not place, and FSDP
  in any case, is placed by `_place`: on the largest free dim it divides, else joining the
  largest already-split dim it still divides (e.g. P(None, ('tensor', 'fsdp'))). So an FFN
  width that tensor=4 does not divide is split over tensor on its other dim, and LOST's b
  and values get FSDP. What stays whole over an axis is returned (see `unsplit_summary`).
  """
  if axes is None:
    axes = (None,) * len(shape)
  spec: list = [None] * len(shape)
  used, missed = set(), []
  for i, (logical, dim) in enumerate(zip(axes, shape)):
    mesh_axis = RULES.get(logical)
    if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1:
      continue
    if dim % mesh.shape[mesh_axis]:
      missed.append(mesh_axis)
      continue
    spec[i] = mesh_axis
    used.add(mesh_axis)
  if not complete_fsdp or math.prod(shape) < MIN_FSDP_SIZE:
    return P(*spec), []
  wanted = [a for a in dict.fromkeys(missed + ["fsdp"]) if a not in used and mesh.shape[a] > 1]
  nbytes = math.prod(shape) * jax.numpy.dtype(dtype).itemsize if dtype is not None else 0
  unsplit = [Unsplit(name or "array", tuple(shape), a, mesh.shape[a], nbytes)
             for a in wanted if not _place(spec, shape, mesh, a)]
  return P(*spec), unsplit


def _place(spec: list, shape, mesh: jax.sharding.Mesh, axis: str) -> bool:
  """Put mesh `axis` on the largest free dim it divides, else on a split one; False if none."""
  size = mesh.shape[axis]
  free = [i for i, ax in enumerate(spec) if ax is None and shape[i] % size == 0]
  if free:
    spec[max(free, key=lambda i: shape[i])] = axis
    return True
  def split(i):
    axes = spec[i] if isinstance(spec[i], tuple) else (spec[i],)
    return math.prod(mesh.shape[a] for a in axes) * size
  taken = [i for i, ax in enumerate(spec) if ax is not None and shape[i] % split(i) == 0]
  if taken:
    i = max(taken, key=lambda i: shape[i])
    spec[i] = (*(spec[i] if isinstance(spec[i], tuple) else (spec[i],)), axis)
    return True
  return False


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, notes: list | None = None):
  """NamedShardings for an nnx.State (or its abstract shape) from each variable's `axes`.

  What stays whole over a mesh axis is appended to `notes` (see `warn_unsharded`).
  """
  notes = [] if notes is None else notes

  def one(path, var):
    axes = var.get_metadata().get("axes")
    if axes is None and isinstance(var, nnx.Param):
      axes = (None,) * len(var.shape)
    if axes is None:   # static index sets (StaticIndices): replicated by design
      return var.replace(NamedSharding(mesh, P()))
    spec, why = plan_spec(axes, var.shape, mesh, _path_name(path), dtype=var.dtype)
    notes.extend(why)
    return var.replace(NamedSharding(mesh, spec))
  return jax.tree_util.tree_map_with_path(one, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def unsplit_summary(notes: list[Unsplit], examples: int = 3) -> list[str]:
  """One line per mesh axis for all arrays it leaves whole: count, bytes, examples, the fix.

  The fix names the largest smaller size of that axis (a divisor of its size, the rest going
  to `data`) that splits a dim of every one of them, where there is one.
  """
  lines = []
  for axis in dict.fromkeys(n.axis for n in notes):
    group = [n for n in notes if n.axis == axis]
    size = group[0].size
    total = sum(n.nbytes for n in group)
    shown = ", ".join(f"{n.name} {n.shape}" for n in group[:examples])
    more = f" and {len(group) - examples} more" if len(group) > examples else ""
    widths = ", ".join(map(str, sorted({d for n in group for d in n.shape if d % size})[:4]))
    smaller = [s for s in range(size - 1, 1, -1) if size % s == 0 and all(
        any(d % s == 0 for d in n.shape) for n in group)]
    fix = (f"--config.mesh.{axis}={smaller[0]} --config.mesh.data=-1 splits a dim of each, or "
           if smaller else "")
    many = len(group) != 1
    lines.append(
        f"sharding: {len(group)} array{'s' * many}{f' ({total / 2**20:.1f} MiB)' if total else ''}"
        f" {'have' if many else 'has'} no dim that {axis}={size} divides and stay"
        f"{'s' * (not many)} whole on each of its devices, e.g. {shown}{more}. Fix: {fix}make "
        f"one dim of each a multiple of {size} (their widths: {widths}), or accept the copies.")
  return lines


def warn_unsharded(notes: list[Unsplit]) -> None:
  """At start-up, `unsplit_summary`'s lines (at most one per mesh axis) as warnings."""
  if jax.process_index() == 0:
    for line in unsplit_summary(notes):
      logging.warning("%s", line)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch dim over (data, fsdp); sequence dim whole."""
  return NamedSharding(mesh, P(BATCH))


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, microbatches: int = 1) -> None:
  """Every micro-batch must split evenly over the data x fsdp shards (rows stay local)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % (shards * microbatches):
    raise UserError(f"config.train.batch_size={batch_size} in {microbatches} micro-batches "
                    f"does not split over the {shards} data x fsdp shards of the mesh. "
                    f"Fix: use a multiple of {shards * microbatches}.")


def constrain_logical(x: jax.Array, axes) -> jax.Array:
  """Inside a traced step, lay `x` out by its logical `axes` alone (no FSDP completion).

  The embedding lookup uses this to gather its FSDP-sharded table before the lookup:
  otherwise the partitioner keeps the table split and all-gathers the token ids instead.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(
      x, plan_spec(axes, x.shape, mesh, complete_fsdp=False)[0])


def constrain_batch(x: jax.Array) -> jax.Array:
  """Shard an activation [B, ...] by batch over (data, fsdp) inside a traced step.

  Acts only under a mesh context with those axes (the train/eval steps set one with
  `jax.sharding.use_abstract_mesh`); elsewhere (generation, plain calls) it is the identity.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
    return x
  if x.shape[0] % math.prod(mesh.shape[a] for a in BATCH):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH, *(None,) * (x.ndim - 1)))


def opt_state_shardings(abstract_opt_state, param_shardings, abstract_params,
                        mesh: jax.sharding.Mesh, notes: list | None = None):
  """Shardings of an optimizer state, found by each leaf's parameter path.

  A leaf under a parameter's path (Adam moments, GaLore's projected moments and projector)
  takes the parameter's sharding when it has the parameter's shape; a differently shaped one
  (GaLore's [m, rank] projector, [rank, n] moments) shards each dim that equals a sharded
  parameter dim on that dim's mesh axes, and FSDP as for parameters. Scalars (step counts)
  replicate. Any other leaf is an error: nothing falls back to replicated silently.
  """
  notes = [] if notes is None else notes
  flat_params = {tuple(_keys(p)): (x.shape, s) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0],
      jax.tree.leaves(param_shardings))}
  longest = max((len(k) for k in flat_params), default=0)

  def one(path, leaf):
    keys = tuple(_keys(path))
    if not leaf.shape:
      return NamedSharding(mesh, P())
    owner = next((keys[-n:] for n in range(min(longest, len(keys)), 0, -1)
                  if keys[-n:] in flat_params), None)
    if owner is None:
      raise ValueError(f"optimizer state leaf {'/'.join(map(str, keys))} {leaf.shape} belongs "
                       "to no parameter. Fix: give it a sharding rule in "
                       "lost_jax.sharding.opt_state_shardings.")
    shape, param_sharding = flat_params[owner]
    if tuple(leaf.shape) == tuple(shape):
      return param_sharding
    spec: list = [None] * len(leaf.shape)
    used = set()
    for axis, dim in zip(param_sharding.spec, shape):
      if axis is None:
        continue
      for i, d in enumerate(leaf.shape):
        if d == dim and spec[i] is None and axis not in used:
          spec[i] = axis
          used.add(axis)
          break
    used = {a for ax in spec if ax for a in (ax if isinstance(ax, tuple) else (ax,))}
    if (mesh.shape["fsdp"] > 1 and "fsdp" not in used
        and math.prod(leaf.shape) >= MIN_FSDP_SIZE and not _place(spec, leaf.shape, mesh, "fsdp")):
      notes.append(Unsplit("opt_state/" + "/".join(map(str, keys)), tuple(leaf.shape), "fsdp",
                           mesh.shape["fsdp"], leaf.size * leaf.dtype.itemsize))
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _keys(path):
  return [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
