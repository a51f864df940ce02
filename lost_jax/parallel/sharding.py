"""Device mesh and the one rule table mapping logical parameter axes to mesh axes."""

from __future__ import annotations

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


def plan_spec(axes, shape, mesh: jax.sharding.Mesh, name: str = "",
              complete_fsdp: bool = True) -> tuple[P, list[str]]:
  """PartitionSpec for a parameter of logical `axes`, and notes on what could not be sharded.

  Each logical axis takes its RULES mesh axis where that axis divides the dim. Then, unless
  the array is tiny (< MIN_FSDP_SIZE elements), FSDP always gets a dim: if no logical axis
  mapped to `fsdp` (LOST's b and values, the down/o projections' a, SLTrain's sparse values),
  it shards the largest free dim it divides, else joins the largest already-sharded dim it
  still divides (e.g. P(None, ('tensor', 'fsdp'))). What stays unsharded is in the notes.
  """
  if axes is None:
    axes = (None,) * len(shape)
  spec: list = [None] * len(shape)
  notes, used = [], set()
  for i, (logical, dim) in enumerate(zip(axes, shape)):
    mesh_axis = RULES.get(logical)
    if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1:
      continue
    if dim % mesh.shape[mesh_axis]:
      notes.append(f"{name or 'array'} {tuple(shape)} dim {i} ({logical}={dim}) is not "
                   f"divisible by mesh axis {mesh_axis}={mesh.shape[mesh_axis]}")
      continue
    spec[i] = mesh_axis
    used.add(mesh_axis)
  fsdp = mesh.shape["fsdp"]
  if complete_fsdp and fsdp > 1 and "fsdp" not in used and math.prod(shape) >= MIN_FSDP_SIZE:
    if not _add_fsdp(spec, shape, mesh):
      notes.append(f"{name or 'array'} {tuple(shape)} has no dim that fsdp={fsdp} divides: "
                   "replicated over fsdp")
  return P(*spec), notes


def _add_fsdp(spec: list, shape, mesh: jax.sharding.Mesh) -> bool:
  """Put `fsdp` on the largest free dim it divides, else on a sharded one; False if none."""
  fsdp = mesh.shape["fsdp"]
  free = [i for i, ax in enumerate(spec) if ax is None and shape[i] % fsdp == 0]
  if free:
    spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return True
  def split(i):
    axes = spec[i] if isinstance(spec[i], tuple) else (spec[i],)
    return math.prod(mesh.shape[a] for a in axes) * fsdp
  taken = [i for i, ax in enumerate(spec) if ax is not None and shape[i] % split(i) == 0]
  if taken:
    i = max(taken, key=lambda i: shape[i])
    spec[i] = (*(spec[i] if isinstance(spec[i], tuple) else (spec[i],)), "fsdp")
    return True
  return False


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, notes: list | None = None):
  """NamedShardings for an nnx.State (or its abstract shape) from each variable's `axes`.

  What could not be sharded is appended to `notes` (see `warn_unsharded`).
  """
  notes = [] if notes is None else notes

  def one(path, var):
    axes = var.get_metadata().get("axes")
    if axes is None and isinstance(var, nnx.Param):
      axes = (None,) * len(var.shape)
    if axes is None:   # static index sets (StaticIndices): replicated by design
      return var.replace(NamedSharding(mesh, P()))
    spec, why = plan_spec(axes, var.shape, mesh, _path_name(path))
    notes.extend(why)
    return var.replace(NamedSharding(mesh, spec))
  return jax.tree_util.tree_map_with_path(one, state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def warn_unsharded(notes: list[str]) -> None:
  """One start-up warning naming every array dim that its mesh axis does not divide."""
  if notes and jax.process_index() == 0:
    logging.warning("sharding: %d arrays are not split as the rules ask (memory per device "
                    "grows; pick mesh sizes that divide these dims):\n  %s", len(notes),
                    "\n  ".join(notes))


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
        and math.prod(leaf.shape) >= MIN_FSDP_SIZE and not _add_fsdp(spec, leaf.shape, mesh)):
      notes.append(f"optimizer state {'/'.join(map(str, keys))} {tuple(leaf.shape)} has no "
                   f"dim that fsdp={mesh.shape['fsdp']} divides: replicated over fsdp")
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _keys(path):
  return [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
