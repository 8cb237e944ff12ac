"""FLOPs and MFU accounting, and where metrics go: metrics.jsonl, TensorBoard, the console, and
profiler traces. `StepLogger` owns the logging cadence, `StepProfiler` the profiled steps."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.extend.core
from etils import epath
from jax._src.interpreters import partial_eval  # dce_jaxpr: no public API
from jax.sharding import Mesh

from jaxlm import storage
from jaxlm.config import Config
from jaxlm.devices import table_entry
from jaxlm.model import moe, registry

log = logging.getLogger("jaxlm")


def peak_flops_per_device(device: jax.Device, config: Config) -> float:
    """Peak FLOP/s of one device: the device table for TPUs and GPUs, `run.cpu_peak_flops` on CPU."""
    if device.platform == "cpu":
        return config.run.cpu_peak_flops
    chip = table_entry(device.device_kind)
    if chip is None:
        log.warning("no peak FLOP/s known for device kind %r; MFU will read 0", device.device_kind)
        return 0.0
    return chip.peak_flops


def model_flops_per_step(config: Config) -> float:
    """Training FLOPs of one step, as the model family counts them (6 per matmul parameter and
    token, plus attention, for a Llama; 4 with LoRA, whose frozen weights get no gradients)."""
    tokens = config.train.global_batch_size * config.data.seq_len
    flops_per_token = registry.family_of(config.model).flops_per_token
    if config.optim.lora.rank:
        return flops_per_token(config.model, config.data.seq_len, frozen_weights=True) * tokens
    return flops_per_token(config.model, config.data.seq_len) * tokens


def matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
    """FLOPs of every matmul in a jaxpr (2 per multiply-add; a grouped `ragged_dot` counted as the
    rows times their own group's matrix) whose result is used, each scan body
    counted as many times as it runs, so rematerialised forward passes and micro-batches are
    included; a shard_map body once per device it runs on, and a Pallas kernel's body once per
    cell of its grid that does work: a kernel that skips blocks (splash attention, above the
    causal diagonal) says under a name scope how many it runs (`registry.share_of_blocks_run`).
    Of a switch's branches (splash's kernels of each window, in a scan over layers of several)
    the dearest is counted, an upper bound.

    Unused results are dropped first, as the compiler drops them: a remat policy that keeps a
    custom-VJP kernel's residuals (splash's, by name) still leaves its forward call in the
    traced backward pass, with no use."""
    used, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return _matmul_flops(used, 1.0)


def _matmul_flops(jaxpr: jax.extend.core.Jaxpr, blocks_run: float, grid_bound: int | None = None) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        bound = moe.DYNAMIC_GRID.search(str(eqn.source_info.name_stack))
        bound = int(bound[1]) if bound else grid_bound  # scopes reach into a custom VJP's jaxprs
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = math.prod(lhs_shape[dim] for dim in contracting)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
        if eqn.primitive.name == "ragged_dot_general":  # a mixture of experts' grouped matmuls
            numbers = eqn.params["ragged_dot_dimension_numbers"]
            (contracting, _), _ = numbers.dot_dimension_numbers
            contracted = math.prod(eqn.invars[0].aval.shape[dim] for dim in contracting)
            flops = 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
            # Each row meets one group's matrix; where the groups are the output's (the weights'
            # gradient, contracting the ragged rows), each row adds to one group's block only.
            total += flops if numbers.rhs_group_dimensions else flops / eqn.invars[2].aval.shape[0]
        runs = registry.share_of_blocks_run(str(eqn.source_info.name_stack)) or blocks_run
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        if eqn.primitive.name == "pallas_call":
            repeats = math.prod(_static_grid(eqn, bound)) * runs
        if eqn.primitive.name == "shard_map":
            repeats = math.prod(eqn.params["mesh"].shape[axis] for axis in eqn.params["newly_manual_axes"])
        inner = [_matmul_flops(jaxpr, runs, bound) for jaxpr in jax.extend.core.jaxprs_in_params(eqn.params)]
        if eqn.primitive.name == "cond":  # one branch runs: counted as the dearest
            inner = [max(inner)]
        total += repeats * sum(inner)
    return total


class MetricsWriter:
    """Appends JSON lines to <run.dir>/metrics.jsonl and scalars to TensorBoard (process 0 only).

    A run resumed at `first_step` trains again the steps its previous run logged past its last
    checkpoint: their records are dropped from metrics.jsonl, and TensorBoard is told to purge
    its events from step first_step + 1 on, so that each step is there once.

    With run.dir in a bucket both are written locally and copied there after every write (see
    `storage.BucketMirror`); TensorBoard events each time too, not only every two minutes.
    """

    def __init__(self, run_dir: epath.Path, first_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self._mirror = storage.BucketMirror(run_dir) if storage.is_bucket(run_dir) else None
        if self._mirror:
            jsonl, tensorboard = self._mirror.fetch("metrics.jsonl"), self._mirror.local / "tensorboard"
        else:
            jsonl, tensorboard = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "tensorboard"
        if first_step:
            _drop_records_after(jsonl, first_step)
        self._jsonl = jsonl.open("a", buffering=1)
        self._tensorboard = SummaryWriter(str(tensorboard), purge_step=first_step + 1 if first_step else None)
        if self._mirror:
            self._mirror.changed()

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, value, step)
        if self._mirror:
            self._tensorboard.flush()
            self._mirror.changed()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
            if self._mirror:
                self._mirror.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite a metrics.jsonl without the records of steps after `step` (and a line cut short by
    a killed process), through a temporary file: a crash leaves the old file or the new one."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept))
    temporary.replace(path)
    log.info(
        "dropped %d records of steps after %d from %s: this run trains those steps again",
        len(lines) - len(kept),
        step,
        path,
    )


class Progress:
    """A live progress line on a terminal (step, loss, tokens/s, ETA); log lines otherwise."""

    def __init__(self, first_step: int, last_step: int):
        self.first_step, self.last_step = first_step, last_step
        self.started = time.perf_counter()
        self._bar = None
        if sys.stderr.isatty() and jax.process_index() == 0:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tokens_per_s]} tok/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=last_step, completed=first_step, loss="-", tokens_per_s="-"
            )
            self._bar.start()

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        fields = {}
        if loss is not None:
            fields = {"loss": f"{loss:.4f}", "tokens_per_s": f"{tokens_per_s:,.0f}"}
            if self._bar is None and jax.process_index() == 0:
                log.info(
                    "step %d/%d  loss %.4f  %s tok/s  eta %s",
                    step,
                    self.last_step,
                    loss,
                    f"{tokens_per_s:,.0f}",
                    self._eta(step),
                )
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **fields)

    def first_step_done(self, step: int) -> None:
        """The first step is slower (warm-up): estimate the ETA from the steps after it."""
        self.started, self.first_step = time.perf_counter(), step

    def _eta(self, step: int) -> str:
        done = step - self.first_step
        if done <= 0:
            return "?"
        seconds = (time.perf_counter() - self.started) / done * (self.last_step - step)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class StepLogger:
    """Every train.log_every steps and at the last, fetches the step's metrics (the loop's only
    host sync), times the steps since the last log, and writes metrics.jsonl, TensorBoard and
    the progress line. The first step compiles and warms up: timing starts after it."""

    def __init__(
        self,
        config: Config,
        mesh: Mesh,
        run_dir: epath.Path,
        first_step: int,
        check_loss: Callable[[float, int], None],
        data_seen: Callable[[], dict[str, float]] = dict,
    ):
        self.every, self.last_step = config.train.log_every, config.train.steps
        self.tokens_per_step = config.train.global_batch_size * config.data.seq_len
        self.flops_per_step = model_flops_per_step(config)
        self.peak_flops = peak_flops_per_device(mesh.devices.flat[0], config) * mesh.size
        self.check_loss = check_loss  # raises on a loss that must stop the run
        self.data_seen = data_seen  # tokens, documents and epochs of the data so far
        self.writer = MetricsWriter(run_dir, first_step)
        self.progress = Progress(first_step, self.last_step)
        self.last: dict[str, Any] = {"step": first_step}  # the latest logged metrics
        self.first_step_done_at: float | None = None  # time.perf_counter()
        self._window_start, self._window_first_step = 0.0, first_step

    def step_done(self, step: int, metrics: dict[str, jax.Array]) -> None:
        if self.first_step_done_at is None:
            jax.block_until_ready(metrics)
            log.info("first step took %.1fs", time.perf_counter() - self.progress.started)
            self.progress.first_step_done(step)
            self.first_step_done_at = self._window_start = time.perf_counter()
            self._window_first_step = step
        if step % self.every == 0 or step == self.last_step:
            self._log(step, metrics)
        else:
            self.progress.update(step)

    def _log(self, step: int, metrics: dict[str, jax.Array]) -> None:
        values = {name: float(value) for name, value in jax.device_get(metrics).items()}
        self.check_loss(values["loss"], step)
        steps = step - self._window_first_step
        seconds = (time.perf_counter() - self._window_start) / max(steps, 1)
        record = {
            **values,
            "tokens_per_s": self.tokens_per_step / seconds if steps else 0.0,
            "mfu": self.flops_per_step / seconds / self.peak_flops if steps and self.peak_flops else 0.0,
            "step_time_s": seconds if steps else 0.0,
            "tokens": step * self.tokens_per_step,
            **self.data_seen(),
        }
        self.writer.write(step, record)
        self.progress.update(step, record["loss"], record["tokens_per_s"])
        self.last = {"step": step, **record}
        self._window_start, self._window_first_step = time.perf_counter(), step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (an evaluation) is not training time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - started

    def write_eval(self, step: int, values: dict[str, float]) -> None:
        self.writer.write(step, values)
        self.last.update(values)
        if jax.process_index() == 0:
            log.info(
                "step %d  %s",
                step,
                "  ".join(f"{_short(name)} {value:.4f}" for name, value in values.items()),
            )

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


def _short(name: str) -> str:
    return {"eval_bits_per_byte": "bits/byte"}.get(name, name)


class StepProfiler:
    """Captures a jax.profiler trace (TensorBoard / Perfetto) of steps [first, last]. A trace
    for a bucket is written locally and copied there (see `storage`)."""

    def __init__(self, steps: Sequence[int], directory: epath.Path):
        self.first, self.last = steps if steps else (0, -1)
        self.directory = directory
        self.active = False
        self._mirror: storage.BucketMirror | None = None

    def before(self, step: int) -> None:
        if step == self.first:
            if storage.is_bucket(self.directory):
                self._mirror = storage.BucketMirror(self.directory)
            jax.profiler.start_trace(str(self._mirror.local if self._mirror else self.directory))
            self.active = True

    def after(self, step: int, metrics) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(metrics)  # the trace must hold the whole of the last step
            self.close()
            log.info("profile of steps %d-%d written to %s", self.first, self.last, self.directory)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self._mirror:
                self._mirror.close()


def _static_grid(eqn, bound: int | None) -> tuple[int, ...]:
    """A Pallas kernel's grid, a dynamic dimension (megablox's row tiles) at the `bound` its name
    scope states (`moe.dynamic_grid_scope`): an upper bound of the cells that run."""
    grid = eqn.params["grid_mapping"].grid
    if all(isinstance(size, int) for size in grid):
        return grid
    if bound is None:
        raise ValueError(
            f"a Pallas kernel's grid {grid} has a dynamic dimension and no dynamic_grid_scope bounding it"
        )
    return tuple(size if isinstance(size, int) else bound for size in grid)
