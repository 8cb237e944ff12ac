"""Everything built before the first batch: the mesh, the model family's abstract parameters and
their shardings, the jitted steps, and for training the optimizer and the whole train state.

`build_model` is the params-only set-up that generation and evaluation need; `build_train` adds
the optimizer state. Nothing here allocates a parameter: the states are shapes with shardings
until `init` (or a checkpoint restore) places them on the devices, already sharded.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import parallel
from jaxlm.config import Config, ModelConfig
from jaxlm.data import pipeline
from jaxlm.errors import ConfigError
from jaxlm.model import registry
from jaxlm.model.layers import attention_kernel, runs_cudnn_attention
from jaxlm.optim import make_optimizer
from jaxlm.step import TrainState, make_eval_step, make_train_step

log = logging.getLogger("jaxlm")


@dataclass
class ModelSetup:
    """A model family's module on a mesh: definition, abstract parameters, shardings."""

    mesh: Mesh
    rules: parallel.Rules
    family: registry.ModelFamily
    model_config: ModelConfig  # with model.attention resolved for these devices
    graphdef: nnx.GraphDef
    abstract_params: Any  # nested dict of ShapeDtypeStructs, the module's nnx.Param values
    param_shardings: Any
    batch_sharding: NamedSharding  # of [batch, length] inputs

    @property
    def attention(self) -> str:
        """The kernel model.attention resolved to on these devices."""
        return self.model_config.attention

    def params(self, key: jax.Array) -> Any:
        """Freshly initialised parameters (not jitted: `init_params` places them sharded)."""
        model = self.family.build(self.model_config, nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def init_params(self, key: jax.Array) -> Any:
        """Initialised parameters, each born on its shards."""
        return jax.jit(self.params, out_shardings=self.param_shardings)(key)


@dataclass
class TrainSetup:
    """A `ModelSetup` with its optimizer: the train state's shapes and shardings."""

    model: ModelSetup
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    init: Callable[[jax.Array], TrainState]  # key → TrainState, jitted straight into its shardings
    start: Callable[[Any], TrainState]  # params → TrainState at step 0 with a fresh optimizer state
    abstract_state: TrainState
    state_shardings: TrainState

    @property
    def mesh(self) -> Mesh:
        return self.model.mesh

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.model.batch_sharding


def build_model(config: Config, devices: Sequence[jax.Device] | None = None) -> ModelSetup:
    """Mesh, model definition and parameter shardings. Raises ConfigError for anything the devices
    make impossible, before compiling."""
    mesh = parallel.make_mesh(config, devices)
    rules = config.mesh.rules
    parallel.check_batch(config, mesh)
    device = mesh.devices.flat[0]
    if config.model.attention == "cudnn" and not runs_cudnn_attention(device):
        raise ConfigError(
            f"model.attention=cudnn needs an NVIDIA GPU of compute capability 9.0 or newer, and these "
            f"devices are {device.device_kind}; use model.attention=auto (or xla)"
        )
    model_config = config.model.model_copy(
        update={"attention": attention_kernel(config.model.attention, device)}
    )
    abstract_model = registry.abstract_model(model_config)
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    logical_axes = jax.tree.map(
        tuple,
        nnx.to_pure_dict(nnx.get_partition_spec(abstract_params)),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    abstract_params = nnx.to_pure_dict(abstract_params)
    return ModelSetup(
        mesh=mesh,
        rules=rules,
        family=registry.family_of(model_config),
        model_config=model_config,
        graphdef=graphdef,
        abstract_params=abstract_params,
        param_shardings=parallel.shardings_from_logical(abstract_params, logical_axes, mesh, rules),
        batch_sharding=parallel.batch_sharding(mesh, rules),
    )


def build_train(config: Config, devices: Sequence[jax.Device] | None = None) -> TrainSetup:
    """`build_model`, the optimizer, and the shardings of the whole train state: the optimizer
    state of each parameter is sharded like the parameter."""
    model = build_model(config, devices)
    optimizer, schedule = make_optimizer(config)

    def init(key: jax.Array) -> TrainState:
        params = model.params(key)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    def start(params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract_state = jax.eval_shape(init, jax.random.key(0))
    replicated = NamedSharding(model.mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        model.param_shardings,
        transform_non_params=lambda _: replicated,
    )
    state_shardings = TrainState(replicated, model.param_shardings, opt_shardings)
    return TrainSetup(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        init=jax.jit(init, out_shardings=state_shardings),
        start=jax.jit(
            start, in_shardings=(model.param_shardings,), out_shardings=state_shardings, donate_argnums=0
        ),
        abstract_state=abstract_state,
        state_shardings=state_shardings,
    )


def jit_train_step(config: Config, setup: TrainSetup) -> Callable:
    """The train step jitted onto the setup's shardings, state donated: what the loop runs and
    what `jaxlm plan` compiles for a topology."""
    step = make_train_step(
        setup.model.graphdef,
        setup.optimizer,
        setup.schedule,
        config.train.micro_batches,
        setup.mesh,
        config.mesh.rules,
        config.train.loss_chunk,
    )
    return jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=0,
    )


def jit_eval_step(config: Config, setup: ModelSetup, token_bytes: np.ndarray) -> Callable:
    """params, batch → (loss sum, trained targets, their bytes), on the setup's shardings."""
    step = make_eval_step(setup.graphdef, token_bytes, setup.mesh, setup.rules, config.train.loss_chunk)
    return jax.jit(step, in_shardings=(setup.param_shardings, setup.batch_sharding))


def abstract_batch(config: Config, batch_sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as sharded shapes."""
    shape = (config.train.global_batch_size, config.data.seq_len)
    return {
        field: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for field in pipeline.FIELDS
    }


def abstract_inputs(config: Config, setup: TrainSetup) -> tuple[TrainState, dict[str, jax.ShapeDtypeStruct]]:
    """The train state and one global batch as sharded shapes, to lower the step ahead of time
    without allocating anything."""
    return with_shardings(setup.abstract_state, setup.state_shardings), abstract_batch(
        config, setup.batch_sharding
    )


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their target sharding (to lower ahead of time, or restore
    a checkpoint onto another mesh)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


def count_params(abstract_params: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params))


def check_state_fits(setup: TrainSetup) -> None:
    """Refuse a train state larger than the memory of the devices that hold it, before it is
    allocated: a GPU or TPU would fail to allocate it; a CPU host would swap or hang."""
    shards = jax.tree.leaves(with_shardings(setup.abstract_state, setup.state_shardings))
    per_device = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in shards)
    local = [d for d in setup.mesh.devices.flat if d.process_index == jax.process_index()]
    device = local[0]  # memory_stats answers for this process's own devices only
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats and per_device > stats["bytes_limit"]:
        raise ConfigError(
            f"the parameters and optimizer state need {per_device / 1e9:.1f} GB per device and a "
            f"{device.device_kind} has {stats['bytes_limit'] / 1e9:.1f} GB; shard them over more devices "
            "(mesh.fsdp) or make the model smaller"
        )
    if device.platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        on_host = per_device * len(local)
        if on_host > host:
            raise ConfigError(
                f"the parameters and optimizer state need {on_host / 1e9:.1f} GB on this host's CPU "
                f"devices and it has {host / 1e9:.1f} GB of memory; make the model smaller or use more hosts"
            )


def compile_ahead(name: str, jitted: Callable, *abstract_args) -> Callable:
    """Lower and compile `jitted` for abstract arguments now, so no compilation falls inside the
    run (or fails after it started)."""
    started = time.perf_counter()
    compiled = jitted.lower(*abstract_args).compile()
    log.info("compiled the %s step in %.1fs", name, time.perf_counter() - started)
    return compiled
