"""`jaxlm plan`: compile the train step of `jaxlm train` for a TPU topology on this host, without
TPUs, and report whether it fits in each chip's HBM and how fast it should run.

The devices are JAX's compile-only devices of the topology (libtpu provides the compiler). The
step is `setup.jit_train_step` on `setup.build_train`'s shardings, lowered with abstract inputs: no
array is ever allocated. Memory comes from the compiler's buffer assignment; time is a roofline
(see docs/planning.md), an estimate rather than a measurement.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from jaxlm import parallel
from jaxlm.config import MESH_AXES, Config, ModelConfig
from jaxlm.devices import CHIPS, Chip, GiB, table_entry
from jaxlm.errors import ConfigError, UserError
from jaxlm.model import registry, remat
from jaxlm.training.metrics import matmul_flops, model_flops_per_step, peak_flops_per_device
from jaxlm.training.setup import abstract_inputs, build_train, count_params, jit_train_step

log = logging.getLogger("jaxlm")


def chip_of(device: jax.Device) -> Chip:
    """The device table's entry for a TPU chip that `jaxlm plan` has memory figures for."""
    chip = table_entry(device.device_kind)
    if chip is None or chip.hbm_bytes is None:
        known = sorted({chip.name for chip in CHIPS.values() if chip.hbm_bytes is not None})
        raise ConfigError(f"no HBM figures for {device.device_kind}; jaxlm plan knows {', '.join(known)}")
    return chip


def topology_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of a TPU topology such as `v5p:4x4x4`, one per chip."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            f'jaxlm plan needs libtpu to compile for TPUs; install it with pip install -e ".[tpu]", '
            f"which brings the libtpu pinned to the installed jax {jax.__version__}"
        )
    # Compile-only devices open no TPU, so there is nothing for several processes to share; and
    # this host is the only worker (else libtpu logs an error looking for the others).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # v4 chips have two cores that JAX drives as one device ("megacore"), as on a real v4 slice.
    options = {"chip_config_name": "megacore"} if topology.lower().startswith("v4") else {}
    try:
        return list(topologies.get_topology_desc(topology, "tpu", **options).devices)
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).splitlines()[0].removeprefix("INVALID_ARGUMENT: ")
        raise ConfigError(
            f"--topology {topology} is not a TPU topology JAX can build ({reason}); use "
            "generation:shape, e.g. v4:2x2x2, v5e:4x4, v5p:4x4x4, v6e:8x8"
        ) from None


def compile_step(config: Config, devices: list[jax.Device]):
    """Lower and compile the train step exactly as `jaxlm train` jits it, for abstract inputs.

    Returns (setup, traced, compiled); compiled is None when the compiler refused the program for
    want of HBM, and the refusal is the fourth value."""
    dcn_slices = math.prod(getattr(config.mesh, f"dcn_{axis}") for axis in MESH_AXES)
    if dcn_slices > 1:
        raise ConfigError(
            f"mesh.dcn_* ask for {dcn_slices} slices but jaxlm plan plans one slice; "
            "set every mesh.dcn_* to 1 and plan the slice"
        )
    setup = build_train(config, _in_mesh_order(config, devices))
    step = jit_train_step(config, setup)
    traced = step.trace(*abstract_inputs(config, setup))
    try:
        return setup, traced, traced.lower().compile(), None
    except jax.errors.JaxRuntimeError as error:
        if not str(error).startswith("RESOURCE_EXHAUSTED"):
            raise
        return setup, traced, None, str(error).splitlines()[0]


def _in_mesh_order(config: Config, devices: list[jax.Device]) -> list[jax.Device]:
    """Devices in the order `jax.make_mesh` lays the mesh onto the physical topology, which is what
    `jaxlm train` gets on the slice itself; `build_train` then reshapes them in that order."""
    sizes = parallel.mesh_shape(config.mesh, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        grid = parallel.topology_grid(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as error:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} cannot be laid onto this topology "
            f"({str(error).splitlines()[0]}); choose axis sizes that follow the topology's shape"
        ) from None
    return list(grid.flat)


def recomputes_weight_matmuls(model: ModelConfig) -> bool:
    """Whether model.remat recomputes a matmul with a weight in the backward pass, so that FSDP
    gathers the weight again (and tensor and context parallelism repeat their forward collectives)."""
    activations = registry.family_of(model).activations
    return remat.recomputes_weight_matmuls(model.remat, model.remat_save, model.remat_offload, activations)


def collective_seconds(
    config: Config,
    mesh_sizes: dict[str, int],
    param_count: int,
    chip: Chip,
    expert_span: tuple[int, ...] | None = None,
) -> float:
    """ICI time of one step's collectives, each on a bidirectional ring over its mesh axis.

    A model of what GSPMD inserts, not a reading of the compiled program: FSDP gathers every
    weight for the forward and backward passes (and the recomputed forward, when the remat policy
    recomputes weight matmuls) and reduce-scatters the gradients; data parallelism all-reduces the
    gradients; tensor parallelism all-reduces the activations of every block as often forward and
    backward as the family's `LayerTraffic` says (twice each for a dense block); context
    parallelism gathers the keys and values the family names forward and reduce-scatters their
    gradients backward, and shards the weights as FSDP does. Expert parallelism shards the
    weights as FSDP does too, except the routed experts' (split over `expert`, gathered over the
    other axes), and sends each token's copies to its experts' devices and back by all-to-all,
    forward and backward (`all_to_all_hops`, over the torus axes the expert axis spans).
    """
    model, train = config.model, config.train
    data, fsdp, expert, context, tensor = (mesh_sizes[axis] for axis in MESH_AXES)
    compute_bytes = jnp.dtype(model.dtype).itemsize
    param_bytes = jnp.dtype(model.param_dtype).itemsize
    forwards = 2 if recomputes_weight_matmuls(model) else 1

    def share(size: int) -> float:  # of an array collected over an axis, the part that travels
        return (size - 1) / size

    traffic = registry.family_of(model).traffic(model)
    weights = param_count / tensor  # this chip's tensor slice of the model
    experts = traffic.expert_params / tensor
    gathered = share(fsdp * context * expert) * (weights - experts) + share(fsdp * context) * experts / expert
    volume = gathered * ((forwards + 1) * compute_bytes + param_bytes)
    fsdp *= context * expert  # `embed` (and `batch`, less context) take the three axes
    volume += 2 * share(data) * weights / fsdp * param_bytes
    rows_per_chip = train.global_batch_size / train.micro_batches / (data * fsdp / context)
    activation = rows_per_chip * config.data.seq_len / context * model.d_model * compute_bytes
    volume += (2 * forwards + 2) * model.num_layers * traffic.tensor_reductions * share(tensor) * activation
    gathered = traffic.context_gathered if context > 1 else None
    kv_width = gathered / tensor if gathered else 0  # none gathered without context
    keys_values = rows_per_chip * config.data.seq_len * kv_width * compute_bytes
    volume += (forwards + 1) * model.num_layers * share(context) * keys_values
    tokens_per_chip = rows_per_chip * config.data.seq_len / context
    copies = tokens_per_chip * traffic.routed_copies * model.d_model * compute_bytes
    volume += 2 * (forwards + 1) * model.num_layers * all_to_all_hops(expert_span or (expert,)) * copies
    return train.micro_batches * volume / (2 * chip.ici_link_bandwidth)


def all_to_all_hops(span: tuple[int, ...]) -> float:
    """Of a chip's all-to-all over chips spanning `span` chips along each axis of a torus (a
    ring: one axis), the link crossings per byte sent, shared over the two links of each axis
    spanned: Σ over the axes of the mean ring distance to a chip on it (self included, at 0),
    divided by the axes spanned. A ring of 8: 2 hops over 1 axis; a 8x8x4 block: (2 + 2 + 1) / 3."""
    spanned = [size for size in span if size > 1]
    if not spanned:
        return 0.0
    distance = sum(sum(min(step, size - step) for step in range(size)) / size for size in spanned)
    return distance / len(spanned)


def axis_span(mesh, axis: str) -> tuple[int, ...] | None:
    """How many distinct coordinates the devices along mesh `axis` (the others at index 0) take on
    each physical axis of the torus; None where the devices have no coordinates (CPU)."""
    group = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), 0)
    group = group.reshape(group.shape[0], -1)[:, 0]
    coords = [getattr(device, "coords", None) for device in group]
    if any(c is None for c in coords):
        return None
    return tuple(len({c[i] for c in coords}) for i in range(len(coords[0])))


@dataclass
class Speed:
    """Time of one step and what follows from it. FLOPs and times are per chip."""

    flops: float  # every matmul of the step, recomputation included
    model_flops: float  # per step, all chips: 6 per parameter and token plus attention, as MFU counts
    peak_flops: float
    chips: int
    tokens_per_step: int
    xla_bytes: float  # XLA's bytes accessed: each scanned loop's body counted once
    xla_seconds: float | None  # XLA's own estimate, when it gives a usable one
    compute_s: float
    memory_s: float
    collective_s: float
    host_bytes: float = 0.0  # to pinned host memory and back over the chip's host link
    host_s: float = 0.0

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.collective_s, self.host_s)

    @property
    def bound(self) -> str:
        times = {
            "compute": self.compute_s,
            "HBM": self.memory_s,
            "ICI": self.collective_s,
            "host": self.host_s,
        }
        return max(times, key=times.__getitem__)

    @property
    def flops_ratio(self) -> float:
        """All matmul FLOPs ÷ the model FLOPs: the price of the remat policy (1.00 recomputes nothing)."""
        return self.flops * self.chips / self.model_flops

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_s / (self.peak_flops * self.chips)


@dataclass
class Plan:
    """One config on one topology. Bytes are per chip."""

    topology: str
    chip: Chip
    chips: int
    mesh: dict[str, int]
    remat: str
    param_count: int
    param_bytes: int
    optimizer_bytes: int
    peak_bytes: int  # the most live at once, which the compiler holds to the HBM (refused: its need)
    hbm_bytes: float
    micro_batches: int = 1
    remat_save: tuple[str, ...] = ()  # model.remat=custom's names
    remat_offload: tuple[str, ...] = ()
    flops_ratio: float | None = None  # the traced step's matmul FLOPs ÷ the model FLOPs
    argument_bytes: int = 0
    temp_bytes: int = 0
    output_bytes: int = 0  # outputs not written in place of the donated state
    host_argument_bytes: int = 0  # state the compiled program keeps in pinned host memory
    host_temp_bytes: int = 0  # activations offloaded between the forward and backward pass
    host_output_bytes: int = 0
    speed: Speed | None = None  # None when the compiler refused the program
    refusal: str | None = None  # the compiler's words when it refused
    # The expert axis's extent along each physical axis of the torus (8 experts on a 4x4x4 v5p:
    # (2, 4, 1)); None where the devices name no coordinates.
    expert_span: tuple[int, ...] | None = None

    @property
    def fits(self) -> bool:
        return self.refusal is None and self.peak_bytes <= self.hbm_bytes

    @property
    def host_bytes(self) -> int:
        """Pinned host memory per chip: host-resident state and offloaded activations."""
        return self.host_argument_bytes + self.host_temp_bytes + self.host_output_bytes


def plan(config: Config, topology: str, devices: list[jax.Device] | None = None) -> Plan:
    """Compile `config`'s train step for `topology` and work out its figures."""
    devices = devices if devices is not None else topology_devices(topology)
    chip = chip_of(devices[0])
    setup, traced, compiled, refusal = compile_step(config, devices)
    state, shardings = setup.abstract_state, setup.state_shardings
    model = config.model
    figures = Plan(
        topology=topology,
        chip=chip,
        chips=len(devices),
        mesh=dict(setup.mesh.shape),
        expert_span=axis_span(setup.mesh, "expert"),
        remat=model.remat,
        param_count=count_params(state.params),
        param_bytes=parallel.bytes_per_device(state.params, shardings.params),
        optimizer_bytes=parallel.bytes_per_device(state.opt_state, shardings.opt_state),
        peak_bytes=0,
        hbm_bytes=chip.hbm_bytes,
        micro_batches=config.train.micro_batches,
        remat_save=tuple(model.remat_save),
        remat_offload=tuple(model.remat_offload),
        flops_ratio=matmul_flops(traced.jaxpr.jaxpr) / model_flops_per_step(config),
    )
    if compiled is None:
        figures.refusal = refusal
        needed, available = _needed_and_available(refusal)
        figures.peak_bytes, figures.hbm_bytes = needed or 0, available or chip.hbm_bytes
        return figures
    memory = compiled.memory_analysis()
    figures.argument_bytes = memory.argument_size_in_bytes
    figures.temp_bytes = memory.temp_size_in_bytes
    figures.output_bytes = memory.output_size_in_bytes - memory.alias_size_in_bytes
    figures.host_argument_bytes = memory.host_argument_size_in_bytes
    figures.host_temp_bytes = memory.host_temp_size_in_bytes
    figures.host_output_bytes = memory.host_output_size_in_bytes - memory.host_alias_size_in_bytes
    # Not all temporaries are live at once: the compiler's peak is what must fit, and what it checks.
    figures.peak_bytes = memory.peak_memory_in_bytes
    if figures.host_bytes:
        # Then its peak counts the host buffers too: it compiled Llama-2-70B offloading 106.64 GiB
        # per chip with a "peak" of 109.65 GiB, 14 GiB over the HBM. What the HBM holds at once is
        # at most the arguments, temporaries and new outputs; and host arguments (optimizer state
        # kept there) are live all through the program, so all of them are in the compiler's peak.
        figures.peak_bytes = min(
            memory.peak_memory_in_bytes - memory.host_argument_size_in_bytes,
            figures.argument_bytes + figures.temp_bytes + figures.output_bytes,
        )
    peak_flops = peak_flops_per_device(devices[0], config)
    figures.speed = _speed(config, figures, compiled.cost_analysis() or {}, peak_flops)
    return figures


def host_transfer_bytes(figures: Plan) -> float:
    """Bytes one step moves over the host link, both ways: host-resident state in and out once, and
    offloaded activations out in each micro-batch's forward pass and back in its backward pass."""
    state = figures.host_argument_bytes + figures.host_output_bytes
    if figures.host_argument_bytes and not figures.host_output_bytes:
        state *= 2  # the updated state written back in place of the donated one
    return state + 2 * figures.micro_batches * figures.host_temp_bytes


def _speed(config: Config, figures: Plan, cost: dict, peak_flops: float) -> Speed:
    chip = figures.chip
    model_flops = model_flops_per_step(config)
    flops = figures.flops_ratio * model_flops / figures.chips
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    xla_seconds = cost.get("optimal_seconds")  # XLA's TPU cost model can return a negative time
    host_bytes = host_transfer_bytes(figures)
    return Speed(
        flops=flops,
        model_flops=model_flops,
        peak_flops=peak_flops,
        chips=figures.chips,
        tokens_per_step=config.train.global_batch_size * config.data.seq_len,
        xla_bytes=xla_bytes,
        xla_seconds=xla_seconds if xla_seconds and xla_seconds > 0 else None,
        compute_s=flops / peak_flops,
        memory_s=xla_bytes / chip.hbm_bandwidth,
        collective_s=collective_seconds(config, figures.mesh, figures.param_count, chip, figures.expert_span),
        host_bytes=host_bytes,
        # The forward pass's writes and the backward pass's reads do not overlap each other.
        host_s=host_bytes / chip.host_link_bandwidth if host_bytes else 0.0,
    )


def host_shortfall(refusal: str | None) -> tuple[int, int] | None:
    """Pinned host memory needed and allowed per chip, when the compiler refused the program for
    want of it ("Ran out of memory in memory space host. Used 140.00G of 128.00G host.")."""
    found = re.search(r"memory space host\. Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) host", refusal or "")
    if found is None:
        return None
    used, used_unit, capacity, capacity_unit = found.groups()
    return _bytes(used, used_unit), _bytes(capacity, capacity_unit)


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "KMGT".index(unit) * 1024)


def _needed_and_available(refusal: str) -> tuple[int | None, int | None]:
    """Bytes the program needs and the HBM there is, from the compiler's out-of-memory message
    ("... required for HLO temporaries (94.55G) exceeds available HBM (15.75G)")."""
    sizes = re.findall(r"\(([\d.]+)([KMGT])\)", refusal)
    if len(sizes) != 2:
        return None, None
    needed, available = (_bytes(number, unit) for number, unit in sizes)
    return needed, available


# ---------------------------------------------------------------------------------------------
# Reports.


def _gib(count: float) -> str:
    return f"{count / GiB:.2f} GiB" if count >= GiB / 10 else f"{count / 2**20:.2f} MiB"


def _mesh(mesh: dict[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in mesh.items())


def remat_label(plan: Plan) -> str:
    """model.remat as the report names it: custom with its names."""
    if plan.remat != "custom":
        return plan.remat
    kept = (("save", plan.remat_save), ("offload", plan.remat_offload))
    parts = [f"{key} {','.join(names)}" for key, names in kept if names]
    return f"custom ({'; '.join(parts) or 'saves nothing'})"


def format_plan(plan: Plan) -> str:
    """The report of `jaxlm plan`: memory, time and throughput per chip, then the verdict."""
    micro = f"{plan.micro_batches} micro-batch{'es' if plan.micro_batches > 1 else ''}"
    lines = [
        f"plan: {plan.topology}, {plan.chips} × {plan.chip.name}; mesh {_mesh(plan.mesh)}; "
        f"remat {remat_label(plan)}; {micro}",
        f"model: {plan.param_count:,} parameters",
        "",
        "memory per chip (the compiler's buffer assignment)",
        f"  parameters        {_gib(plan.param_bytes):>12}",
        f"  optimizer state   {_gib(plan.optimizer_bytes):>12}",
    ]
    if plan.refusal is None:
        lines += [
            f"  arguments         {_gib(plan.argument_bytes):>12}   state and batch, padded to TPU tiles",
            f"  temporaries       {_gib(plan.temp_bytes):>12}   activations, gradients, workspace; not all live at once",
            f"  new outputs       {_gib(plan.output_bytes):>12}   outputs not written in place of the state",
            *_host_lines(plan),
        ]
    else:
        lines.append(f"  the compiler refused the program: {plan.refusal}")
    share = plan.peak_bytes / plan.hbm_bytes
    recomputed = f"; {plan.flops_ratio:.2f}× the model FLOPs" if plan.flops_ratio else ""
    if plan.peak_bytes:
        live = "at most arguments + temporaries" if plan.host_bytes else "live at once"
        lines.append(
            f"  peak              {_gib(plan.peak_bytes):>12}   {live}, of {_gib(plan.hbm_bytes)} HBM "
            f"({share:.0%}){recomputed}"
        )
    else:
        lines.append(f"  peak              {'not known':>12}   the compiler stopped before{recomputed}")
    if plan.speed is not None:
        lines += ["", *_speed_lines(plan.speed, plan.chip)]
    return "\n".join([*lines, "", verdict(plan)])


def _host_lines(plan: Plan) -> list[str]:
    """Pinned host memory, where the compiled program puts anything there."""
    lines = []
    if plan.host_argument_bytes or plan.host_output_bytes:
        state = max(plan.host_argument_bytes, plan.host_output_bytes)
        lines.append(f"  host: state       {_gib(state):>12}   kept in pinned host memory between steps")
    if plan.host_temp_bytes:
        lines.append(
            f"  host: temporaries {_gib(plan.host_temp_bytes):>12}   during the step: offloaded activations, "
            "state on its way"
        )
    return lines


def _speed_lines(speed: Speed, chip: Chip) -> list[str]:
    xla = f"{speed.xla_seconds:.4g} s, each loop once" if speed.xla_seconds else "no usable figure"
    host = []
    if speed.host_bytes:
        host = [
            f"  host transfers    {speed.host_s:10.4g} s   {_gib(speed.host_bytes)} to host and back, "
            f"at an assumed {chip.host_link_bandwidth / 1e9:.0f} GB/s"
        ]
    return [
        "time per step (a lower bound: the slowest of compute, HBM, ICI and host; see docs/planning.md)",
        f"  FLOPs per chip    {speed.flops:12.3e}   every matmul, {speed.flops_ratio:.2f}× the model FLOPs",
        f"  compute           {speed.compute_s:10.4g} s   at the peak {speed.peak_flops / 1e12:.0f} TFLOP/s",
        f"  HBM traffic       {speed.memory_s:10.4g} s   XLA's bytes accessed, each scanned loop once",
        f"  ICI collectives   {speed.collective_s:10.4g} s   modelled from the mesh and the model's shapes",
        *host,
        f"  step              {speed.step_s:10.4g} s   {speed.bound}-bound (XLA's cost model: {xla})",
        f"at best: {speed.tokens_per_s:,.0f} tokens/s ({speed.tokens_per_s / speed.chips:,.0f} per chip), "
        f"MFU {speed.mfu:.1%}",
    ]


def verdict(plan: Plan) -> str:
    hbm = plan.hbm_bytes
    if plan.fits:
        return f"fits: {_gib(plan.peak_bytes)} of the {_gib(hbm)} of HBM per chip ({_gib(hbm - plan.peak_bytes)} spare)"
    fixes = ["model.remat=full"] if plan.remat not in ("full", "minimal") else []
    fixes = ", ".join([*fixes, "more train.micro_batches", "a larger topology", "jaxlm plan --sweep"])
    host = host_shortfall(plan.refusal)
    if host is not None:
        needed, allowed = host
        return (
            f"does not fit: needs {_gib(needed)} of pinned host memory per chip, {_gib(needed - allowed)} more "
            f"than the {_gib(allowed)} the TPU compiler allows; offload less (model.remat_offload), or try {fixes}"
        )
    if plan.peak_bytes <= hbm:  # refused, with a message that does not say how much it needs
        return (
            f"does not fit: the compiler ran out of the {_gib(hbm)} of HBM of a {plan.chip.name}; try {fixes}"
        )
    excess = plan.peak_bytes - hbm
    return (
        f"does not fit: needs {_gib(plan.peak_bytes)} per chip, {_gib(excess)} ({excess / hbm:.0%}) more "
        f"than the {_gib(hbm)} of a {plan.chip.name}; try {fixes}"
    )
