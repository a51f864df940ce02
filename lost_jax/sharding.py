"""Device mesh and the one rule table mapping logical parameter axes to mesh axes."""

from __future__ import annotations

import math

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lost_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Anything unlisted ('rank', 'norm', None) is replicated.
RULES = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
}
BATCH = ("data", "fsdp")


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
  """PartitionSpec for a parameter; a dim the mesh axis does not divide stays replicated."""
  if axes is None:
    return P()
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axis = RULES.get(name)
    if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh):
  """NamedShardings for an nnx.State (or its abstract shape) from each variable's `axes`."""
  def one(var):
    axes = var.get_metadata().get("axes")
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch dim over (data, fsdp); sequence dim whole."""
  return NamedSharding(mesh, P(BATCH))


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise UserError(f"config.train.batch_size={batch_size} does not split over the "
                    f"{shards} data x fsdp shards of the mesh. Fix: use a multiple of {shards}.")


def _fits(shape, spec: P, mesh: jax.sharding.Mesh) -> bool:
  if len(spec) > len(shape):
    return False
  return all(ax is None or dim % mesh.shape[ax] == 0 for dim, ax in zip(shape, spec))


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh: jax.sharding.Mesh):
  """Optimizer moments follow their parameter's sharding; counts, projectors etc. replicate."""
  import optax  # local: sharding is otherwise optimizer-agnostic
  repl = replicated(mesh)

  def like_param(leaf, s):
    same = hasattr(leaf, "shape") and _fits(leaf.shape, s.spec, mesh)
    return s if same else repl

  try:
    return optax.tree_map_params(tx, like_param, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  except (ValueError, TypeError):
    # A state whose structure does not mirror the parameters: replicate it all.
    return jax.tree.map(lambda _: repl, abstract_opt_state)
