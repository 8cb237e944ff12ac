"""`jaxlm plan --sweep`: plan the splits of a topology over the mesh axes, with the remat policies
and micro-batch counts that fit each, and rank what fits by estimated step time.

Compiles stay bounded: per split, the policies are tried from the least recomputation to the
most at one micro-batch until one fits; then each larger micro-batch count tries only policies
that recompute less than the last that fitted, lightest last, until one does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax

from jaxlm.config import Config, apply_override, config_from_dict
from jaxlm.devices import GiB
from jaxlm.errors import ConfigError
from jaxlm.planning.plan import Plan, plan, remat_label, topology_devices

log = logging.getLogger("jaxlm")

# Least recomputation first with splash attention, which TPUs run (docs/memory.md): save_all_dots
# keeps the kernel's residuals and recomputes nothing; dots and dots_no_batch run its forward
# again (with XLA's attention, dots keeps the scores instead and save_all_dots recomputes them).
# `minimal` is `full` under another name; the offload preset keeps what the one before it keeps,
# in host memory, for the host link's time.
SWEEP_POLICIES = (
    "none",
    "save_all_dots",
    "dots",
    "dots_no_batch",
    "save_dot_except_mlpwi",
    "offload_dot_except_mlpwi",
    "save_dot_except_mlp",
    "save_qkv_proj",
    "save_out_proj",
    "full",
)
MAX_TENSOR = 8  # tensor parallelism beyond a host's chips is rarely worth its all-reduces
LONG_SEQUENCE = 16384  # from here on the sweep splits sequences too (context parallelism)
MAX_CONTEXT = 32


@dataclass
class Trial:
    """One candidate of a sweep: the plan, or why the config could not be built."""

    overrides: list[str]
    plan: Plan | None = None
    skipped: str | None = None

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits


def mesh_splits(chips: int, seq_len: int = 0, experts: int = 0) -> list[tuple[int, int, int, int, int]]:
    """(data, fsdp, expert, context, tensor) sizes whose product is `chips`: tensor at most
    MAX_TENSOR; context 1 unless rows are LONG_SEQUENCE tokens or more (then up to MAX_CONTEXT,
    each splitting a row into two chunks per shard); expert 1 unless the model has `experts`
    (then any split of them)."""
    divisors = [d for d in range(1, chips + 1) if chips % d == 0]
    contexts = [
        c
        for c in divisors
        if c == 1 or (seq_len >= LONG_SEQUENCE and c <= MAX_CONTEXT and seq_len % (2 * c) == 0)
    ]
    expert_sizes = [e for e in divisors if e == 1 or (experts and experts % e == 0)]
    return [
        (data, chips // (expert * context * tensor) // data, expert, context, tensor)
        for expert in expert_sizes
        for context in contexts
        if (chips // expert) % context == 0
        for tensor in divisors
        if tensor <= MAX_TENSOR and (chips // (expert * context)) % tensor == 0
        for data in divisors
        if (chips // (expert * context * tensor)) % data == 0
    ]


def micro_batch_counts(global_batch_size: int, data: int, fsdp: int) -> list[int]:
    """1, 2, 4, ... while each divides the rows of a data-parallel shard."""
    rows, counts = global_batch_size // (data * fsdp), [1]
    while rows and rows % (counts[-1] * 2) == 0:
        counts.append(counts[-1] * 2)
    return counts


Attempt = Callable[[str, int], Trial]  # (model.remat, train.micro_batches) → its trial


def search(attempt: Attempt, policies: Sequence[str], counts: Sequence[int]) -> list[Trial]:
    """One split's candidates. At counts[0] micro-batches, the first of `policies` (least
    recomputation first) that fits; at each larger count, going down from the one just lighter
    than the last fit, the lightest that fits. Returns the candidates that fit, else the last one
    tried, or the reason the split cannot be built."""
    lightest = len(policies)  # the index of the lightest policy that fitted so far
    for index, remat in enumerate(policies):
        last = attempt(remat, counts[0])
        if last.skipped:
            return [last]
        if last.fits:
            lightest = index
            break
    fitting = [last] if last.fits else []
    for count in counts[1:]:
        if lightest == 0:  # nothing recomputes less than no remat
            break
        found = None
        for index in range(lightest - 1, -1, -1):
            last = attempt(policies[index], count)
            if not last.fits:
                break
            found, lightest = last, index
        fitting += [found] if found else []
    return fitting or [last]


def sweep(config: Config, topology: str, devices: list[jax.Device] | None = None) -> list[Trial]:
    """Plan each split's candidates (see `search`); all of them, ranked best first."""
    devices = devices if devices is not None else topology_devices(topology)
    splits = mesh_splits(len(devices), config.data.seq_len, getattr(config.model, "num_experts", 0))
    trials = []
    for number, split in enumerate(splits, start=1):
        trials += search_split(config, topology, devices, split, f"{number}/{len(splits)}")
    return sorted(trials, key=rank)


def search_split(
    config: Config,
    topology: str,
    devices: list[jax.Device],
    split: tuple[int, int, int, int, int],
    progress: str = "",
) -> list[Trial]:
    """`search` over SWEEP_POLICIES and the micro-batch counts for one (data, fsdp, expert,
    context, tensor); mesh.expert is named for a model with experts only."""
    data, fsdp, expert, context, tensor = split
    mesh = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.context={context}", f"mesh.tensor={tensor}"]
    if getattr(config.model, "num_experts", 0):
        mesh.insert(2, f"mesh.expert={expert}")

    def attempt(remat: str, micro_batches: int) -> Trial:
        trial = _try(
            config, topology, devices, [*mesh, f"model.remat={remat}", f"train.micro_batches={micro_batches}"]
        )
        outcome = trial.skipped or ("fits" if trial.fits else "does not fit")
        log.info("sweep %s: %s: %s", progress, " ".join(trial.overrides), outcome)
        return trial

    counts = micro_batch_counts(config.train.global_batch_size, data, fsdp * expert)
    return search(attempt, SWEEP_POLICIES, counts)


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


def rank(trial: Trial) -> tuple:
    """Fastest first; ties (compute-bound splits) go to less ICI traffic, then to less memory."""
    if trial.plan is None:
        return (2,)
    if not trial.plan.fits:
        return (1, trial.plan.peak_bytes)
    speed = trial.plan.speed
    return (0, step_rank_key(speed.step_s), speed.collective_s, trial.plan.peak_bytes)


def format_sweep(topology: str, trials: list[Trial]) -> str:
    """The sweep's table, best first, then what was skipped and the overrides of the winner."""
    lines = [
        f"sweep of {topology}: splits over data × fsdp × expert × context × tensor; per split, the "
        "least recomputation that fits, at 1 micro-batch and more",
        f"{'rank':>4}  {'data':>4}  {'fsdp':>4}  {'expert':>6}  {'context':>7}  {'tensor':>6}  {'remat':<24}  {'micro':>5}  "
        f"{'GiB/chip':>8}  {'FLOPs×':>6}  {'step s':>8}  {'tokens/s':>12}  {'MFU':>6}  bound",
    ]
    planned = [trial.plan for trial in trials if trial.plan is not None]
    for number, result in enumerate(planned, start=1):
        mesh = result.mesh
        sizes = f"{mesh['data']:>4}  {mesh['fsdp']:>4}  {mesh['expert']:>6}  {mesh['context']:>7}  {mesh['tensor']:>6}"
        policy = f"{remat_label(result):<24}  {result.micro_batches:>5}"
        memory = f"{result.peak_bytes / GiB:8.2f}  {result.flops_ratio or 0:6.2f}"
        if result.fits and result.speed is not None:
            speed = result.speed
            figures = f"{speed.step_s:8.3g}  {speed.tokens_per_s:12,.0f}  {speed.mfu:6.1%}  {speed.bound}"
            lines.append(f"{number:>4}  {sizes}  {policy}  {memory}  {figures}")
        else:
            lines.append(f"{'-':>4}  {sizes}  {policy}  {memory}  does not fit")
    lines += [
        f"skipped {' '.join(o for o in trial.overrides if o.startswith('mesh.'))}: {trial.skipped}"
        for trial in trials
        if trial.skipped
    ]
    best = next((trial for trial in trials if trial.fits), None)
    if best is None:
        lines.append(f"nothing fits on {topology}; try a larger topology")
    else:
        lines.append(f"best: {' '.join(best.overrides)}")
    return "\n".join(lines)
