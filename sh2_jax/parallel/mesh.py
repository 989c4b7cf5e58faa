"""The device mesh and the one table mapping logical axis names to mesh axes.

Modules name their parameters' axes logically ("embed", "mlp", "heads", ...); this table maps
them onto the mesh axes `data`, `fsdp`, `tensor`, `context`:
- FSDP shards every parameter's "embed" dimension (and so the optimizer state); with
  `mesh.context_fsdp` over fsdp x context (`logical_axis_rules`).
- Tensor parallelism splits projections Megatron-style: column-parallel into the mixer/MLP
  ("channels", "heads", "mlp"), row-parallel out of them; Hyena groups stay whole on a rank
  because channel shards are contiguous and groups are contiguous blocks of channels.
- The batch spans `data` x `fsdp`; the sequence spans `context`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sh2_jax.config import MeshConfig

MESH_AXES = MeshConfig.AXES

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # ---- activations ----
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    # ---- parameters ----
    ("vocab", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("channels", "tensor"),
    ("heads", "tensor"),
    ("groups", "tensor"),
    ("qkv", None),
    ("streams", None),  # the Hyena in-projection's post / pre / value
    ("kv", None),
    ("taps", None),
    ("poles", None),
    ("norm", None),
)


def logical_axis_rules(mesh_config: MeshConfig | None = None) -> tuple[tuple[str, Any], ...]:
  """The rule table for a mesh config: LOGICAL_AXIS_RULES, with "embed" over fsdp x context
  when `mesh_config.context_fsdp`."""
  if mesh_config is None or not mesh_config.context_fsdp:
    return LOGICAL_AXIS_RULES
  return tuple(("embed", ("fsdp", "context")) if name == "embed" else (name, axes)
               for name, axes in LOGICAL_AXIS_RULES)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes (data, fsdp, tensor, context), Auto-typed."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = config.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_shardings(boxed_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree of (abstract) values boxed with logical axis names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, L] token batch: rows over data x fsdp (the sequence stays whole here)."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
  return ", ".join(f"{name}={size}" for name, size in mesh.shape.items()) + \
      f" over {np.size(mesh.devices)} {mesh.devices.flat[0].platform} device(s)"
