"""Meshes from config and the one table that maps logical axis names to mesh axes.

Models name their parameter and activation axes logically ("batch", "embed", "expert", ...);
only the rules below decide which mesh axis, if any, each name is split over. Changing the
parallelism is a config change, never a model change.
"""

import contextlib
from collections.abc import Mapping, Sequence

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mm_jax.errors import ConfigError

# Mesh axes, outermost first. `data` and `expert` both split the batch (GShard style); `expert`
# additionally splits the experts, `model` splits hidden/head/vocab dimensions.
MESH_AXES = ("data", "expert", "model")

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "expert")),
  ("length", None),
  ("embed", None),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", None),
  ("vocab", "model"),
  ("classes", None),
  ("expert", "expert"),
  ("expert_mlp", "model"),
  ("group", ("data", "expert")),
  ("capacity", None),
  ("height", None),
  ("width", None),
  ("channels", None),
  ("conv_kernel", None),
  ("target_space", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves a {axis: size} mapping (one size may be -1) against the device count."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ConfigError(
      f"config.mesh has unknown axis {sorted(unknown)[0]!r}: use only {', '.join(MESH_AXES)}"
    )
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {fill}: set the others to sizes")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size}: use a positive size or -1 to fill")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if num_devices % fixed:
      raise ConfigError(
        f"config.mesh.{fill[0]}=-1 cannot fill {num_devices} devices with the other axes' "
        f"product {fixed}: make {num_devices} divisible by it"
      )
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
      f"config.mesh {sizes} uses {fixed} devices but {num_devices} are present: "
      "make the product equal the device count or set one axis to -1"
    )
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types (jitted steps shard by rules, not by explicit types)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(overrides: Mapping[str, object] | None = None):
  """The rules table, with per-name overrides (config.mesh_rules): "a,b", "a", "" = replicate.

  `batch` is fixed: the input pipeline splits each batch over data x expert.
  """
  rules = dict(DEFAULT_RULES)
  for name, axes in (overrides or {}).items():
    if name not in rules:
      raise ConfigError(
        f"config.mesh_rules.{name}: unknown logical axis name; use one of {', '.join(rules)}"
      )
    parsed = _parse_axes(name, axes)
    if name == "batch" and parsed != rules["batch"]:
      raise ConfigError(
        f"config.mesh_rules.batch={axes!r}: the batch is always split over data,expert; "
        "change config.mesh sizes instead"
      )
    rules[name] = parsed
  return tuple(rules.items())


def _parse_axes(name: str, axes) -> str | tuple[str, ...] | None:
  if isinstance(axes, str):
    axes = [a.strip() for a in axes.split(",") if a.strip()]
  elif axes is None:
    axes = []
  elif not isinstance(axes, list | tuple):
    raise ConfigError(f"config.mesh_rules.{name}={axes!r}: use mesh axis names like 'data,expert'")
  bad = [a for a in axes if a not in MESH_AXES]
  if bad or len(set(axes)) != len(axes):
    raise ConfigError(
      f"config.mesh_rules.{name}={','.join(map(str, axes))!r}: use distinct mesh axes from "
      f"{', '.join(MESH_AXES)} ('' replicates)"
    )
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def rules_config() -> dict[str, str]:
  """The default table as config strings, so any rule can be overridden from the command line."""
  return {
    name: ",".join((axes,) if isinstance(axes, str) else axes or ()) for name, axes in DEFAULT_RULES
  }


def config_rules(config):
  """The rules a config asks for."""
  return logical_rules(config.mesh_rules)


def mesh_axes_of(rules, name: str) -> tuple[str, ...]:
  axes = dict(rules)[name]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the mesh axes that `batch` maps to."""
  axes = dict(DEFAULT_RULES)["batch"]
  return int(np.prod([mesh.shape[a] for a in axes]))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over the batch axes, the rest replicated."""
  spec = PartitionSpec(dict(DEFAULT_RULES)["batch"], *([None] * (ndim - 1)))
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh: Mesh):
  """Assembles per-process numpy batches into global arrays split over the batch axes."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x),
    local_batch,
  )


@contextlib.contextmanager
def activate(mesh: Mesh, rules=None):
  """Mesh and logical rules for tracing: flax resolves logical constraints via jax.set_mesh.

  (A bare `with mesh:` is not enough: flax's `with_logical_constraint` reads the abstract mesh
  that only `jax.set_mesh` installs, and silently does nothing without it.)
  """
  import flax.linen as nn

  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules() if rules is None else rules):
    yield
