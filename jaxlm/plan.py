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
from jax.experimental import topologies

from jaxlm import parallel
from jaxlm.config import MESH_AXES, Config, apply_override, config_from_dict
from jaxlm.devices import CHIPS, Chip, GiB, table_entry
from jaxlm.errors import ConfigError, UserError
from jaxlm.metrics import matmul_flops, model_flops_per_step, peak_flops_per_device
from jaxlm.model import registry
from jaxlm.setup import abstract_inputs, build_train, count_params, jit_train_step

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
        mesh = jax.make_mesh(shape, MESH_AXES, devices=devices)
    except (ValueError, NotImplementedError) as error:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} cannot be laid onto this topology "
            f"({str(error).splitlines()[0]}); choose axis sizes that follow the topology's shape"
        ) from None
    return list(mesh.devices.flat)


def collective_seconds(config: Config, mesh_sizes: dict[str, int], param_count: int, chip: Chip) -> float:
    """ICI time of one step's collectives, each on a bidirectional ring over its mesh axis.

    A model of what GSPMD inserts, not a reading of the compiled program: FSDP gathers every
    weight for the forward and backward passes (and the recomputed forward with full remat) and
    reduce-scatters the gradients; data parallelism all-reduces the gradients; tensor
    parallelism all-reduces the activations of every block twice forward and twice backward;
    context parallelism gathers every layer's keys and values forward and reduce-scatters their
    gradients backward, and shards the weights as FSDP does.
    """
    model, train = config.model, config.train
    data, fsdp, context, tensor = (mesh_sizes[axis] for axis in MESH_AXES)
    fsdp *= context  # `embed` takes both axes
    compute_bytes = jnp.dtype(model.dtype).itemsize
    param_bytes = jnp.dtype(model.param_dtype).itemsize
    full_remat = model.remat == "full"

    def share(size: int) -> float:  # of an array collected over an axis, the part that travels
        return (size - 1) / size

    weights = param_count / tensor  # this chip's tensor slice of the model
    gathers = 3 if full_remat else 2
    volume = share(fsdp) * weights * (gathers * compute_bytes + param_bytes)
    volume += 2 * share(data) * weights / fsdp * param_bytes
    rows_per_chip = train.global_batch_size / train.micro_batches / (data * fsdp / context)
    activation = rows_per_chip * config.data.seq_len / context * model.d_model * compute_bytes
    volume += (6 if full_remat else 4) * model.num_layers * 2 * share(tensor) * activation
    kv_per_token = registry.family_of(model).kv_per_token if context > 1 else None
    kv_width = kv_per_token(model) / tensor if kv_per_token else 0  # none gathered without context
    keys_values = rows_per_chip * config.data.seq_len * kv_width * compute_bytes
    volume += (3 if full_remat else 2) * model.num_layers * share(context) * keys_values
    return train.micro_batches * volume / (2 * chip.ici_link_bandwidth)


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

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.collective_s)

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_s, "HBM": self.memory_s, "ICI": self.collective_s}
        return max(times, key=times.__getitem__)

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
    argument_bytes: int = 0
    temp_bytes: int = 0
    output_bytes: int = 0  # outputs not written in place of the donated state
    speed: Speed | None = None  # None when the compiler refused the program
    refusal: str | None = None  # the compiler's words when it refused

    @property
    def fits(self) -> bool:
        return self.refusal is None and self.peak_bytes <= self.hbm_bytes


def plan(config: Config, topology: str, devices: list[jax.Device] | None = None) -> Plan:
    """Compile `config`'s train step for `topology` and work out its figures."""
    devices = devices if devices is not None else topology_devices(topology)
    chip = chip_of(devices[0])
    setup, traced, compiled, refusal = compile_step(config, devices)
    state, shardings = setup.abstract_state, setup.state_shardings
    figures = Plan(
        topology=topology,
        chip=chip,
        chips=len(devices),
        mesh=dict(setup.mesh.shape),
        remat=config.model.remat,
        param_count=count_params(state.params),
        param_bytes=parallel.bytes_per_device(state.params, shardings.params),
        optimizer_bytes=parallel.bytes_per_device(state.opt_state, shardings.opt_state),
        peak_bytes=0,
        hbm_bytes=chip.hbm_bytes,
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
    # Not all temporaries are live at once: the compiler's peak is what must fit, and what it checks.
    figures.peak_bytes = memory.peak_memory_in_bytes
    peak_flops = peak_flops_per_device(devices[0], config)
    figures.speed = _speed(config, figures, traced, compiled.cost_analysis() or {}, peak_flops)
    return figures


def _speed(config: Config, figures: Plan, traced, cost: dict, peak_flops: float) -> Speed:
    chip = figures.chip
    flops = matmul_flops(traced.jaxpr.jaxpr) / figures.chips
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    xla_seconds = cost.get("optimal_seconds")  # XLA's TPU cost model can return a negative time
    return Speed(
        flops=flops,
        model_flops=model_flops_per_step(config),
        peak_flops=peak_flops,
        chips=figures.chips,
        tokens_per_step=config.train.global_batch_size * config.data.seq_len,
        xla_bytes=xla_bytes,
        xla_seconds=xla_seconds if xla_seconds and xla_seconds > 0 else None,
        compute_s=flops / peak_flops,
        memory_s=xla_bytes / chip.hbm_bandwidth,
        collective_s=collective_seconds(config, figures.mesh, figures.param_count, chip),
    )


def _needed_and_available(refusal: str) -> tuple[int | None, int | None]:
    """Bytes the program needs and the HBM there is, from the compiler's out-of-memory message
    ("... required for HLO temporaries (94.55G) exceeds available HBM (15.75G)")."""
    sizes = re.findall(r"\(([\d.]+)([KMGT])\)", refusal)
    if len(sizes) != 2:
        return None, None
    needed, available = (int(float(number) * 1024 ** "KMGT".index(unit) * 1024) for number, unit in sizes)
    return needed, available


# ---------------------------------------------------------------------------------------------
# Sweep: the splits of the topology over the mesh axes, and the remat policies.

# Least recomputation first: for one split, the first policy that fits is the fastest that fits.
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")
MAX_TENSOR = 8  # tensor parallelism beyond a host's chips is rarely worth its all-reduces


@dataclass
class Trial:
    """One candidate of a sweep: the plan, or why the config could not be built."""

    overrides: list[str]
    plan: Plan | None = None
    skipped: str | None = None


LONG_SEQUENCE = 16384  # from here on the sweep splits sequences too (context parallelism)
MAX_CONTEXT = 32


def mesh_splits(chips: int, seq_len: int = 0) -> list[tuple[int, int, int, int]]:
    """(data, fsdp, context, tensor) sizes whose product is `chips`: tensor at most MAX_TENSOR,
    and context 1 unless rows are LONG_SEQUENCE tokens or more (then up to MAX_CONTEXT, each
    splitting a row into two chunks per shard)."""
    divisors = [d for d in range(1, chips + 1) if chips % d == 0]
    contexts = [
        c
        for c in divisors
        if c == 1 or (seq_len >= LONG_SEQUENCE and c <= MAX_CONTEXT and seq_len % (2 * c) == 0)
    ]
    return [
        (data, chips // (context * tensor) // data, context, tensor)
        for context in contexts
        for tensor in divisors
        if tensor <= MAX_TENSOR and (chips // context) % tensor == 0
        for data in divisors
        if (chips // (context * tensor)) % data == 0
    ]


def sweep(config: Config, topology: str, devices: list[jax.Device] | None = None) -> list[Trial]:
    """Per split, plan the remat policies in order until one fits; one trial per split, best first."""
    devices = devices if devices is not None else topology_devices(topology)
    splits = mesh_splits(len(devices), config.data.seq_len)
    trials = []
    for number, (data, fsdp, context, tensor) in enumerate(splits, start=1):
        mesh = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.context={context}", f"mesh.tensor={tensor}"]
        for remat in REMAT_POLICIES:
            trial = _try(config, topology, devices, [*mesh, f"model.remat={remat}"])
            outcome = trial.skipped or ("fits" if trial.plan.fits else "does not fit")
            log.info("sweep %d/%d: %s: %s", number, len(splits), " ".join(trial.overrides), outcome)
            if trial.skipped or trial.plan.fits:
                break
        trials.append(trial)  # the policy that fits, else the most frugal one, or why the split failed
    return sorted(trials, key=_rank)


def _try(config: Config, topology: str, devices: list[jax.Device], overrides: list[str]) -> Trial:
    raw = config.to_dict()
    for override in overrides:
        apply_override(raw, override)
    try:
        return Trial(overrides, plan=plan(config_from_dict(raw), topology, devices))
    except ConfigError as error:
        return Trial(overrides, skipped=str(error))


def step_rank_key(step_s: float) -> float:
    """Step times equal to 3 significant figures tie (a roofline is no finer than that)."""
    return float(f"{step_s:.3g}")


def _rank(trial: Trial) -> tuple:
    """Fastest first; ties (compute-bound splits) go to less ICI traffic, then to less memory."""
    if trial.plan is None:
        return (2,)
    if not trial.plan.fits:
        return (1, trial.plan.peak_bytes)
    speed = trial.plan.speed
    return (0, step_rank_key(speed.step_s), speed.collective_s, trial.plan.peak_bytes)


# ---------------------------------------------------------------------------------------------
# Reports.


def _gib(count: float) -> str:
    return f"{count / GiB:.2f} GiB" if count >= GiB / 10 else f"{count / 2**20:.2f} MiB"


def _mesh(mesh: dict[str, int]) -> str:
    return " ".join(f"{axis}={size}" for axis, size in mesh.items())


def format_plan(plan: Plan) -> str:
    """The report of `jaxlm plan`: memory, time and throughput per chip, then the verdict."""
    lines = [
        f"plan: {plan.topology}, {plan.chips} × {plan.chip.name}; mesh {_mesh(plan.mesh)}; remat {plan.remat}",
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
        ]
    else:
        lines.append(f"  the compiler refused the program: {plan.refusal}")
    share = plan.peak_bytes / plan.hbm_bytes
    lines.append(
        f"  peak              {_gib(plan.peak_bytes):>12}   live at once, of {_gib(plan.hbm_bytes)} HBM ({share:.0%})"
    )
    if plan.speed is not None:
        lines += ["", *_speed_lines(plan.speed)]
    return "\n".join([*lines, "", verdict(plan)])


def _speed_lines(speed: Speed) -> list[str]:
    xla = f"{speed.xla_seconds:.4g} s, each loop once" if speed.xla_seconds else "no usable figure"
    recomputation = speed.flops * speed.chips / speed.model_flops
    return [
        "time per step (a lower bound: the slowest of compute, HBM and ICI; see docs/planning.md)",
        f"  FLOPs per chip    {speed.flops:12.3e}   every matmul, {recomputation:.2f}× the model FLOPs",
        f"  compute           {speed.compute_s:10.4g} s   at the peak {speed.peak_flops / 1e12:.0f} TFLOP/s",
        f"  HBM traffic       {speed.memory_s:10.4g} s   XLA's bytes accessed, each scanned loop once",
        f"  ICI collectives   {speed.collective_s:10.4g} s   modelled from the mesh and the model's shapes",
        f"  step              {speed.step_s:10.4g} s   {speed.bound}-bound (XLA's cost model: {xla})",
        f"at best: {speed.tokens_per_s:,.0f} tokens/s ({speed.tokens_per_s / speed.chips:,.0f} per chip), "
        f"MFU {speed.mfu:.1%}",
    ]


def verdict(plan: Plan) -> str:
    hbm = plan.hbm_bytes
    if plan.fits:
        return f"fits: {_gib(plan.peak_bytes)} of the {_gib(hbm)} of HBM per chip ({_gib(hbm - plan.peak_bytes)} spare)"
    fixes = ["model.remat=full"] if plan.remat != "full" else []
    fixes = ", ".join([*fixes, "more train.micro_batches", "a larger topology", "jaxlm plan --sweep"])
    if plan.peak_bytes <= hbm:  # refused, with a message that does not say how much it needs
        return (
            f"does not fit: the compiler ran out of the {_gib(hbm)} of HBM of a {plan.chip.name}; try {fixes}"
        )
    excess = plan.peak_bytes - hbm
    return (
        f"does not fit: needs {_gib(plan.peak_bytes)} per chip, {_gib(excess)} ({excess / hbm:.0%}) more "
        f"than the {_gib(hbm)} of a {plan.chip.name}; try {fixes}"
    )


def format_sweep(topology: str, trials: list[Trial]) -> str:
    """The sweep's table, best first, then what was skipped and the overrides of the winner."""
    lines = [
        f"sweep of {topology}: splits over data × fsdp × context × tensor; per split, remat policies until one fits",
        f"{'rank':>4}  {'data':>4}  {'fsdp':>4}  {'context':>7}  {'tensor':>6}  {'remat':<13}  {'GiB/chip':>8}  "
        f"{'step s':>8}  {'tokens/s':>12}  {'MFU':>6}  bound",
    ]
    planned = [trial.plan for trial in trials if trial.plan is not None]
    for rank, plan in enumerate(planned, start=1):
        mesh = plan.mesh
        sizes = f"{mesh['data']:>4}  {mesh['fsdp']:>4}  {mesh['context']:>7}  {mesh['tensor']:>6}  {plan.remat:<13}"
        memory = f"{plan.peak_bytes / GiB:8.2f}"
        if plan.fits and plan.speed is not None:
            speed = plan.speed
            figures = f"{speed.step_s:8.3g}  {speed.tokens_per_s:12,.0f}  {speed.mfu:6.1%}  {speed.bound}"
            lines.append(f"{rank:>4}  {sizes}  {memory}  {figures}")
        else:
            lines.append(f"{'-':>4}  {sizes}  {memory}  does not fit")
    lines += [
        f"skipped {' '.join(trial.overrides[:4])}: {trial.skipped}" for trial in trials if trial.skipped
    ]
    best = next((trial for trial in trials if trial.plan and trial.plan.fits), None)
    if best is None:
        lines.append(f"nothing fits on {topology}; try more train.micro_batches or a larger topology")
    else:
        lines.append(f"best: {' '.join(best.overrides)}")
    return "\n".join(lines)
