"""Device mesh, logical-axis rules, and the shardings of the train state and the batch.

The model only names logical axes (`embed`, `heads`, `batch`...). This module is the one place
that turns those names into mesh axes, using `mesh.rules` from the config.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

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
    """The (data, fsdp, expert, context, tensor) mesh over `devices` (default: all devices of all processes).

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
            f"{slice_count} equal slices; make the product of the mesh.dcn_* sizes divide {len(devices)}"
        )
    ici = mesh_shape(config.mesh, len(devices) // slice_count)
    shape = tuple(ici[axis] * dcn[axis] for axis in MESH_AXES)
    if slice_count == 1:
        if len(devices) == len(jax.devices()):
            return Mesh(topology_grid(shape, devices), MESH_AXES, axis_types=AUTO_AXES)
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


def topology_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """`devices` as an array of `shape`, ordered for the physical topology (ICI rings on TPU,
    NVLink on GPU) as `jax.make_mesh` orders them. Where an axis is no product of whole physical
    axes (8 experts on a 4x4x4 v5p), a physical axis is split between mesh axes, as MaxText's
    allow_split_physical_axes does."""
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=AUTO_AXES, devices=devices).devices
    except (ValueError, NotImplementedError):
        return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)


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
                f"({key.replace('_index', '')}s); make the product of the mesh.dcn_* sizes equal {len(groups)}"
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
        parts = axis_size(mesh, axes)
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
            f"({' × '.join(f'mesh.{axis}' for axis in config.mesh.rules.get('batch') or ())}); "
            f"use a multiple of {dp * config.train.micro_batches}"
        )
    if rows % jax.process_count():
        raise ConfigError(
            f"train.global_batch_size={rows} is not divisible by the {jax.process_count()} processes"
        )


@dataclass(frozen=True)
class ProcessRows:
    """The rows of each global batch that this process reads: the block its devices hold."""

    first: int
    count: int
    counted: bool  # whether this process counts them in the data seen (one process per block)


def process_rows(sharding: NamedSharding, shape: tuple[int, int]) -> ProcessRows:
    """This process's rows of a [rows, length] batch on `sharding`.

    Processes whose devices split the same rows' sequences (context or tensor parallelism across
    hosts) read the same rows; the first of them counts them."""
    blocks: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        blocks.setdefault(device.process_index, set()).update(range(*index[0].indices(shape[0])))
    mine = sorted(blocks[jax.process_index()])
    for process, rows in blocks.items():
        others = [block for block in blocks.values() if block != rows]
        if rows != set(range(min(rows), min(rows) + len(rows))) or any(rows & block for block in others):
            raise ConfigError(
                f"the mesh gives process {process} rows {sorted(rows)[:4]}... of each batch, not one "
                "block that other processes share whole or not at all; order the mesh so that "
                "processes split whole rows (mesh.data/fsdp across hosts, context/tensor within)"
            )
    sharers = [process for process, rows in blocks.items() if rows == set(mine)]
    return ProcessRows(mine[0], len(mine), counted=min(sharers) == jax.process_index())


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


def activation_context() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) installed by `activation_sharding`, or None outside one: for code that
    places activations by hand (the splash-attention kernel's shard_map)."""
    return _ACTIVATION_CONTEXT.get()


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
            axes if axes is None or dim % axis_size(mesh, axes) == 0 else None
            for dim, axes in zip(x.shape, spec, strict=False)
        )
    )
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def context_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways context parallelism splits the sequence: the size of the `length` rule's axes."""
    return axis_size(mesh, rules.get("length") or ())


def check_context(config: Config, shards: int) -> None:
    """What `shards`-way context parallelism (`context_size`) asks of the row length, one line
    each before compiling."""
    if shards == 1:
        return
    seq_len, chunk = config.data.seq_len, config.train.loss_chunk
    if seq_len % (2 * shards):
        raise ConfigError(
            f"data.seq_len={seq_len} does not split into the {2 * shards} equal chunks that "
            f"mesh.context={shards} balances the causal mask with (two per shard); use a multiple of {2 * shards}"
        )
    if chunk and chunk < seq_len and (seq_len // shards) % chunk:
        raise ConfigError(
            f"train.loss_chunk={chunk} does not divide the {seq_len // shards} positions each of the "
            f"mesh.context={shards} shards holds; use a divisor of {seq_len // shards}"
        )


def context_shards() -> int:
    """How many ways the sequence (`length`) of activations is split in the sharding context
    installed by `activation_sharding` (context parallelism); 1 outside one."""
    context = activation_context()
    return 1 if context is None else context_size(*context)


def load_balanced_order(length: int, shards: int) -> np.ndarray:
    """[length] int: the original position of each position of a row laid out for `shards`-way
    context parallelism under a causal mask.

    Split in order, the last shard's queries would attend to the whole row and the first's to
    almost nothing. Cut into 2 × shards chunks instead, shard i holds chunk i and chunk
    2 × shards − 1 − i: every shard then holds the same number of (query, key) pairs below the
    diagonal. One shard is the identity."""
    chunks = 2 * shards
    if length % chunks:
        raise ValueError(f"length {length} does not split into {chunks} chunks")
    chunk = length // chunks
    starts = [start for i in range(shards) for start in (i * chunk, (chunks - 1 - i) * chunk)]
    return np.concatenate([np.arange(start, start + chunk) for start in starts])


def axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Devices along mesh `axes` (a PartitionSpec entry: a name, names, or None for none)."""
    return math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes or ()))


def _describe_sizes(sizes: Mapping[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in sizes.items())


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
