"""Device meshes and logical-axis sharding (MaxText's shape).

Model code names axes logically (`batch, length, embed, heads, kv_heads, kv, mlp, vocab,
layers`); a rules table maps each name to mesh axes (`data`, `fsdp`, `tensor`). The same
train step and sampler then run on 1 CPU, 8 fake CPU devices, a GPU box or a TPU pod:

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    with activate(mesh, rules):      # activation constraints inside jit follow the rules
      params = jax.device_put(params, param_shardings(model.config, mesh, rules))

All mesh axes are `AxisType.Auto`: XLA's partitioner propagates shardings from the
parameter/batch placements and the logical constraints; nothing in the model depends on
sharding-in-types (explicit axes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; one axis may be -1 (= all remaining devices). Default: pure data parallel."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    dims = [self.data, self.fsdp, self.tensor]
    if sum(d == -1 for d in dims) > 1:
      raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1; got {dims}")
    if any(d == 0 or d < -1 for d in dims):
      raise ValueError(f"mesh: axis sizes must be positive or -1; got data={self.data} fsdp={self.fsdp} "
                       f"tensor={self.tensor}")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
      if num_devices % known:
        raise ValueError(f"mesh: {num_devices} devices cannot be split into fsdp*tensor*data with fixed axes {dims}")
      dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) > num_devices:
      raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(dims)} but only {num_devices} devices are available; "
                       "set the axis sizes so that their product is at most the device count (or use -1 for one axis)")
    return tuple(dims)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  A mesh smaller than the device list uses its first data*fsdp*tensor devices.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.shape(len(devices))
  devices = devices[:math.prod(shape)]
  try:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(name, rules) -> tuple[str, ...]:
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return ()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  """PartitionSpec for one array: each logical name -> its mesh axes, keeping only axes that
  divide the dimension and are not used by an earlier dimension (else that dim is replicated)."""
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = []
    size = 1
    for ax in _mesh_axes_for(name, rules) if name else ():
      if ax in used or dim % (size * mesh.shape[ax]):
        continue
      axes.append(ax)
      size *= mesh.shape[ax]
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def shardings_for(logical_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding pytree from a pytree of logical PartitionSpecs and one of shapes."""
  is_spec = lambda x: isinstance(x, P)
  return jax.tree_util.tree_map(
      lambda spec, s: NamedSharding(mesh, logical_to_spec(tuple(spec), s.shape, mesh, rules)),
      logical_tree, shapes_tree, is_leaf=is_spec)


def param_shardings(model_cfg, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every parameter of a MaskedDiffusionTransformer config."""
  from diffrag.models.transformer import logical_axes, param_shapes  # pylint: disable=import-outside-toplevel
  return shardings_for(logical_axes(model_cfg), param_shapes(model_cfg), mesh, rules)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] batch: the batch axis over the rules' `batch` mesh axes."""
  axes = _mesh_axes_for("batch", rules)
  return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
  """Within: `nn.with_logical_constraint` in traced code maps names through `rules` on `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def rules_from_config(table: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  """A rules table from a config mapping (logical name -> mesh axis, list of axes, or null)."""
  if not table:
    return DEFAULT_RULES
  out = []
  for name, axes in table.items():
    for ax in ([axes] if isinstance(axes, str) else (axes or [])):
      if ax not in MESH_AXES:
        raise ValueError(f"mesh rules: {name!r} -> {ax!r} is not a mesh axis; expected one of {MESH_AXES}")
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)
