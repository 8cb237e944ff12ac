"""Device mesh, logical-axis rules, and the shardings of the train state and the batch.

The model only names logical axes (`embed`, `heads`, `batch`...). This module is the one place
that turns those names into mesh axes, using `mesh.rules` from the config.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import MESH_AXES, Config, MeshConfig
from jaxlm.errors import ConfigError

Rules = Mapping[str, Sequence[str] | None]

# GSPMD-style meshes: shardings of parameters and inputs are fixed, the compiler propagates the
# rest, and `constrain` pins the activations that matter.
AUTO_AXES = (AxisType.Auto,) * len(MESH_AXES)


def mesh_shape(mesh_config: MeshConfig, device_count: int) -> dict[str, int]:
    """Sizes of the mesh axes, with the one -1 axis taking the remaining devices."""
    sizes = {axis: getattr(mesh_config, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if -1 in sizes.values():
        free_axis = next(axis for axis, size in sizes.items() if size == -1)
        if device_count % fixed:
            raise ConfigError(
                f"mesh {_describe_sizes(sizes)} needs a multiple of {fixed} devices for mesh.{free_axis}=-1, "
                f"but there are {device_count}; use sizes whose product divides {device_count} ({_divisors(device_count)})"
            )
        sizes[free_axis] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(
            f"mesh {_describe_sizes(sizes)} uses {fixed} devices but there are {device_count}; "
            f"make the product {device_count} or set one axis to -1"
        )
    return sizes


def make_mesh(config: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    With `mesh.dcn_*` > 1 the devices form slices joined by the data-center network: each mesh
    axis is the DCN size (major) times the within-slice (ICI) size, so collectives over the
    within-slice part stay on the fast interconnect.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = {axis: getattr(config.mesh, f"dcn_{axis}") for axis in MESH_AXES}
    slice_count = math.prod(dcn.values())
    if len(devices) % slice_count:
        raise ConfigError(
            f"mesh.dcn_* ask for {slice_count} slices but {len(devices)} devices do not split into "
            f"{slice_count} equal slices; make dcn_data × dcn_fsdp × dcn_tensor divide {len(devices)}"
        )
    ici = mesh_shape(config.mesh, len(devices) // slice_count)
    shape = tuple(ici[axis] * dcn[axis] for axis in MESH_AXES)
    if slice_count == 1:
        if len(devices) == len(jax.devices()):
            # Lets JAX order devices for the physical topology (ICI rings on TPU, NVLink on GPU).
            return jax.make_mesh(shape, MESH_AXES, axis_types=AUTO_AXES, devices=devices)
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=AUTO_AXES)
    ici_shape = tuple(ici[axis] for axis in MESH_AXES)
    dcn_shape = tuple(dcn[axis] for axis in MESH_AXES)
    granule = _slice_granule(devices, slice_count)
    if granule is not None:
        device_grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape,
            dcn_shape,
            devices,
            process_is_granule=granule == "process_index",
            allow_split_physical_axes=True,
        )
    else:
        # One process whose devices name no slices (a CPU test, one GPU host): JAX's hybrid mesh
        # groups devices only by slice or process, so consecutive blocks stand in for slices here.
        per_slice = len(devices) // slice_count
        blocks = np.empty(dcn_shape, dtype=object)
        for index in np.ndindex(dcn_shape):
            first = np.ravel_multi_index(index, dcn_shape) * per_slice
            blocks[index] = mesh_utils.create_device_mesh(
                ici_shape, devices=devices[first : first + per_slice], allow_split_physical_axes=True
            )
        device_grid = np.block(blocks.tolist())
    return Mesh(device_grid, MESH_AXES, axis_types=AUTO_AXES)


def _slice_granule(devices: Sequence[jax.Device], slice_count: int) -> str | None:
    """The device attribute that tells the slices apart: TPU slices, else processes, else (one
    process, e.g. a CPU test) None."""
    for key in ("slice_index", "process_index"):
        groups = {getattr(device, key, 0) for device in devices}
        if len(groups) == slice_count:
            return key
        if len(groups) > 1:
            raise ConfigError(
                f"mesh.dcn_* ask for {slice_count} slices but the devices come in {len(groups)} "
                f"({key.replace('_index', '')}s); make dcn_data × dcn_fsdp × dcn_tensor equal {len(groups)}"
            )
    return None


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        mesh_axes = [axis for axis in (rules.get(name) or ()) if axis not in used] if name else []
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, logical_axes) -> None:
    """Fail with one line when a sharded dimension does not divide evenly over its mesh axes."""
    for dim, axes, logical in zip(shape, spec, logical_axes, strict=False):
        if axes is None:
            continue
        parts = _axis_size(mesh, axes)
        axes = (axes,) if isinstance(axes, str) else axes
        if dim % parts:
            raise ConfigError(
                f"{name}: dimension {logical}={dim} does not divide over mesh axes {'×'.join(axes)} "
                f"({parts} devices); change the mesh or set mesh.rules.{logical}=null to replicate it"
            )


def shardings_from_logical(abstract_tree, logical_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree of arrays given a matching tree of logical-axis tuples."""

    def one(path, leaf, logical_axes):
        spec = logical_to_spec(logical_axes, rules)
        check_divisible(
            jax.tree_util.keystr(path, simple=True, separator="."),
            leaf.shape,
            spec,
            mesh,
            logical_axes,
        )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, tuple)
    )


def bytes_per_device(abstract_tree, shardings) -> int:
    """Bytes of one device's shard of every array in a tree (the largest shard, where they differ)."""
    return sum(
        math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True)
    )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a [batch, length] host batch assembled into a global array."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split."""
    spec = logical_to_spec(("batch",), rules)[0]
    axes = (spec,) if isinstance(spec, str) else (spec or ())
    return math.prod(mesh.shape[axis] for axis in axes)


def rows_split_evenly(rows: int, mesh: Mesh, rules: Rules) -> int:
    """The fewest rows, at least `rows`, that the batch's devices split evenly (a padded batch)."""
    data_parallel = data_parallel_size(mesh, rules)
    return -(-rows // data_parallel) * data_parallel


def check_batch(config: Config, mesh: Mesh) -> None:
    """The global batch must split evenly over data-parallel devices, micro-batches and processes."""
    dp = data_parallel_size(mesh, config.mesh.rules)
    rows = config.train.global_batch_size
    per_micro = rows // config.train.micro_batches
    if per_micro % dp:
        raise ConfigError(
            f"train.global_batch_size={rows} with train.micro_batches={config.train.micro_batches} gives "
            f"{per_micro} rows per micro-batch, not divisible by the {dp} data-parallel devices "
            f"(mesh.data × mesh.fsdp); use a multiple of {dp * config.train.micro_batches}"
        )
    if rows % jax.process_count():
        raise ConfigError(
            f"train.global_batch_size={rows} is not divisible by the {jax.process_count()} processes"
        )


# Activation sharding: the train step installs (mesh, rules) while it traces the model, and the
# model calls `constrain` with logical names. Outside that context `constrain` does nothing, so
# the model runs unchanged on a single device or in a test.
_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxlm_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    token = _ACTIVATION_CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axis names (no-op outside a sharding context)."""
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    spec = logical_to_spec(logical_axes, rules)
    # An activation dimension that does not divide over its mesh axes (e.g. 2 kv heads on 4-way
    # tensor parallelism) is left to the compiler rather than padded.
    spec = PartitionSpec(
        *(
            axes if axes is None or dim % _axis_size(mesh, axes) == 0 else None
            for dim, axes in zip(x.shape, spec, strict=False)
        )
    )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _axis_size(mesh: Mesh, axes: str | Sequence[str]) -> int:
    return math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes))


def _describe_sizes(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in sizes.items())


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
