"""Everything built before the first batch: the mesh, the model family's abstract parameters and
their shardings, the jitted steps, and for training the optimizer and the whole train state.

`build_model` is the params-only set-up that generation and evaluation need; `build_train` adds
the optimizer state. Nothing here allocates a parameter: the states are shapes with shardings
until `init` (or a checkpoint restore) places them on the devices, already sharded.

With optim.lora the model carries adapters (`jaxlm.model.lora`): they are the trained parameters,
the only ones with gradients and optimizer state; the base weights ride along in the train state
unchanged.
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
from jaxlm.model import registry, remat, splash
from jaxlm.model.layers import XLA_KERNEL, AttentionKernel, attention_kernel, runs_cudnn_attention
from jaxlm.model.lora import LoRASpec, combine, split_adapters
from jaxlm.training import lora
from jaxlm.training.optim import make_optimizer
from jaxlm.training.step import TrainState, make_eval_step, make_train_step

log = logging.getLogger("jaxlm")


@dataclass
class ModelSetup:
    """A model family's module on a mesh: definition, abstract parameters, shardings."""

    mesh: Mesh
    rules: parallel.Rules
    family: registry.ModelFamily
    model_config: ModelConfig
    kernel: AttentionKernel  # the config's attention section, resolved for these devices
    graphdef: nnx.GraphDef
    abstract_params: Any  # nested dict of ShapeDtypeStructs, the module's nnx.Param values
    param_shardings: Any
    batch_sharding: NamedSharding  # of [batch, length] inputs
    lora: LoRASpec | None = None  # the adapters among the parameters (optim.lora), if any

    @property
    def attention(self) -> str:
        """The kernel attention.kernel resolved to on these devices."""
        return self.kernel.kind

    def process_rows(self, shape: tuple[int, int]) -> parallel.ProcessRows:
        """The rows of a [rows, length] batch this process reads (`parallel.process_rows`)."""
        return parallel.process_rows(self.batch_sharding, shape)

    @property
    def base_abstract_params(self) -> Any:
        """The parameters of the model without its adapters: what a model source holds."""
        return split_adapters(self.abstract_params)[1]

    @property
    def base_param_shardings(self) -> Any:
        return split_adapters(self.param_shardings)[1]

    def trainable(self, params: Any) -> tuple[Any, Any]:
        """(trained, frozen) parameters: with LoRA the adapters and the rest, else all and none."""
        return split_adapters(params) if self.lora else (params, {})

    def params(self, key: jax.Array) -> Any:
        """Freshly initialised parameters (not jitted: `init_params` places them sharded). The
        adapters draw from a stream of their own, so the base is the same with or without them."""
        rngs = nnx.Rngs(params=key, lora=jax.random.fold_in(key, lora.INIT_STREAM))
        model = registry.build(self.model_config, rngs, self.kernel, self.lora)
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
    # base params (and adapters, else fresh ones with LoRA) → TrainState at step 0 with a fresh
    # optimizer state
    start: Callable[..., TrainState]
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
    context = parallel.context_size(mesh, rules)
    parallel.check_context(config, context)
    if remat.offloads(config.model.remat, config.model.remat_offload):
        fix = "use a model.remat that keeps activations on the device, e.g. save_dot_except_mlpwi"
        check_host_memory(mesh, f"model.remat={config.model.remat} (it offloads activations)", fix)
    family = registry.family_of(config.model)
    if context > 1 and family.traffic(config.model).context_gathered is None:
        raise ConfigError(
            f"model.family={config.model.family} does not lay its rows out for context parallelism, "
            f"and mesh.context={context} splits them; use mesh.context=1"
        )
    kernel = resolve_attention(config, mesh.devices.flat[0], context)
    adapters = lora.spec_of(config.optim.lora, config.model)
    setup = model_setup(config.model, adapters, mesh, rules, kernel)
    if adapters:
        lora.check_rank(adapters, config.model, setup.abstract_params)
    return setup


def resolve_attention(config: Config, device: jax.Device, context: int) -> AttentionKernel:
    """The kernel attention.kernel names on a mesh of `device`s that splits rows `context` ways
    (`attention_kernel`), with its settings, or one line for a kernel they cannot run or that
    cannot compute what the family's attention needs. Under context parallelism auto takes XLA's
    attention over cuDNN's (whole rows only), and splash only for rows its blocks cut (else
    XLA's too)."""
    attention = config.attention
    setting = attention.kernel
    if setting == "cudnn" and not runs_cudnn_attention(device):
        raise ConfigError(
            f"attention.kernel=cudnn needs an NVIDIA GPU of compute capability 9.0 or newer, and these "
            f"devices are {device.device_kind}; use attention.kernel=auto (or xla)"
        )
    if setting == "cudnn" and context > 1:
        raise ConfigError(
            f"attention.kernel=cudnn takes whole rows, and mesh.context={context} splits them; use "
            "attention.kernel=auto (XLA's attention under context parallelism on GPUs)"
        )
    kind = attention_kernel(setting, device)
    needs = registry.family_of(config.model).attention(config.model)
    unmet = _unmet_needs(needs, kind)
    if (kind == "cudnn" and context > 1) or (
        kind == "splash" and setting == "auto" and not splash.rows_fit(config.data.seq_len, context)
    ):
        kind = "xla"
    if setting == "auto" and kind != "xla" and unmet:
        kind = "xla"  # the einsums compute any mask and cap
    if kind != "xla" and unmet:
        raise ConfigError(
            f"attention.kernel={kind} does not compute the {unmet} model.family={config.model.family} "
            "asks for; use attention.kernel=xla (or auto)"
        )
    if kind == "splash":
        splash.check_config(attention, config.data.seq_len, device, context)
    return AttentionKernel.of(attention, kind)


def _unmet_needs(needs: registry.AttentionNeeds, kind: str) -> str:
    """What of `needs` the `kind` of kernel does not compute, in words ('' for nothing): XLA's
    attention computes all of it, splash sliding windows but no soft-capping, cuDNN neither."""
    unmet = []
    if needs.sliding_window is not None and kind == "cudnn":
        unmet.append(f"sliding window of {needs.sliding_window} tokens")
    if needs.logit_softcap is not None and kind != "xla":
        unmet.append(f"soft-capping of attention scores at {needs.logit_softcap}")
    if needs.latent and kind == "cudnn":
        unmet.append("latent attention (values narrower than keys)")
    return " and ".join(unmet)


def model_setup(
    model_config: ModelConfig,
    adapters: LoRASpec | None,
    mesh: Mesh,
    rules: parallel.Rules,
    kernel: AttentionKernel = XLA_KERNEL,
) -> ModelSetup:
    """The module of `model_config` (with `adapters`, if any) on `mesh`, its attention run by
    `kernel`: its abstract parameters and their shardings."""
    abstract_model = registry.abstract_model(model_config, kernel, adapters)
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
        kernel=kernel,
        graphdef=graphdef,
        abstract_params=abstract_params,
        param_shardings=parallel.shardings_from_logical(abstract_params, logical_axes, mesh, rules),
        batch_sharding=parallel.batch_sharding(mesh, rules),
        lora=adapters,
    )


def build_train(config: Config, devices: Sequence[jax.Device] | None = None) -> TrainSetup:
    """`build_model`, the optimizer, and the shardings of the whole train state: the optimizer
    state of each trained parameter is sharded like the parameter."""
    model = build_model(config, devices)
    if config.optim.lora.init_from and not (model.lora and config.model.init_from):
        raise ConfigError(
            f"optim.lora.init_from={config.optim.lora.init_from} needs optim.lora.rank > 0 and model.init_from "
            "set to the base model the adapter was made for"
        )
    optimizer, schedule = make_optimizer(config)

    def at_step_0(params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(model.trainable(params)[0]))

    def init(key: jax.Array) -> TrainState:
        return at_step_0(model.params(key))

    def start_fresh(base: Any) -> TrainState:  # with LoRA: fresh adapters (the rest of the init is unused)
        adapters = split_adapters(model.params(jax.random.key(config.train.seed)))[0] if model.lora else {}
        return at_step_0(combine(adapters, base))

    abstract_state = jax.eval_shape(init, jax.random.key(0))
    replicated = NamedSharding(model.mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        model.trainable(model.param_shardings)[0],
        transform_non_params=lambda _: replicated,
    )
    if config.optim.offload_state:
        check_host_memory(model.mesh, "optim.offload_state=true", "use optim.offload_state=false")
        opt_shardings = jax.tree.map(lambda sharding: sharding.with_memory_kind(HOST), opt_shardings)
    state_shardings = TrainState(replicated, model.param_shardings, opt_shardings)
    base_shardings, adapter_shardings = model.base_param_shardings, split_adapters(model.param_shardings)[0]
    fresh = jax.jit(
        start_fresh, in_shardings=(base_shardings,), out_shardings=state_shardings, donate_argnums=0
    )
    given = jax.jit(
        lambda base, adapters: at_step_0(combine(adapters, base)),
        in_shardings=(base_shardings, adapter_shardings),
        out_shardings=state_shardings,
        donate_argnums=(0, 1),
    )

    def start(base: Any, adapters: Any = None) -> TrainState:
        return fresh(base) if adapters is None else given(base, adapters)

    return TrainSetup(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        init=jax.jit(init, out_shardings=state_shardings),
        start=start,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
    )


HOST = "pinned_host"  # the host memory kind a device can compute with, where offloaded state lives


def check_host_memory(mesh: Mesh, setting: str, fix: str) -> None:
    """One line for devices without the pinned host memory that `setting` moves arrays to."""
    device = mesh.devices.flat[0]
    if HOST not in {memory.kind for memory in device.addressable_memories()}:
        raise ConfigError(
            f"{setting} needs devices with {HOST} memory, and {device.device_kind} devices have none; {fix}"
        )


def opt_state_moves(host_shardings: Any) -> tuple[Callable, Callable]:
    """For an optimizer state kept on `host_shardings`: the moves into the devices' own memory
    (for the update) and back, inside the jitted step."""
    device_shardings = jax.tree.map(
        lambda sharding: sharding.with_memory_kind(sharding.mesh.devices.flat[0].default_memory().kind),
        host_shardings,
    )
    return (
        lambda opt_state: jax.device_put(opt_state, device_shardings),
        lambda opt_state: jax.device_put(opt_state, host_shardings),
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
        trainable=setup.model.trainable,
        dropout_seed=config.train.seed if setup.model.lora and setup.model.lora.dropout else None,
        offloaded_opt_state=opt_state_moves(setup.state_shardings.opt_state)
        if config.optim.offload_state
        else None,
        bias_update_rate=getattr(config.model, "bias_update_rate", 0.0),
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
    sizes = [
        (math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize, a.sharding.memory_kind)
        for a in shards
    ]
    per_device = sum(size for size, kind in sizes if kind != HOST)  # not optim.offload_state's
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
        on_host = sum(size for size, _ in sizes) * len(local)
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
