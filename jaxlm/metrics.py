"""FLOPs and MFU accounting, and where metrics go: metrics.jsonl, TensorBoard, the console, and
profiler traces."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.extend.core

from jaxlm.config import Config, ModelConfig

log = logging.getLogger("jaxlm")

# Dense bf16 peak FLOP/s of one chip (one device), from the vendors' data sheets. Matched by the
# longest prefix of `device.device_kind`.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def peak_flops_per_device(device: jax.Device, config: Config) -> float:
    """Peak FLOP/s of one device: the table for TPUs and GPUs, `run.cpu_peak_flops` on CPU."""
    if device.platform == "cpu":
        return config.run.cpu_peak_flops
    for kind in sorted(PEAK_FLOPS_BY_DEVICE_KIND, key=len, reverse=True):
        if device.device_kind.startswith(kind):
            return PEAK_FLOPS_BY_DEVICE_KIND[kind]
    log.warning("no peak FLOP/s known for device kind %r; MFU will read 0", device.device_kind)
    return 0.0


def matmul_params(model: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup does not)."""
    d, h, k, hd = model.d_model, model.num_heads, model.num_kv_heads, model.head_dim
    attention = d * h * hd + 2 * d * k * hd + h * hd * d
    mlp = 3 * d * model.mlp_dim
    return model.num_layers * (attention + mlp) + d * model.vocab_size


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward + backward), plus attention scores
    and values over the whole row (12·layers·heads·head_dim·seq_len, causal masking not discounted,
    as XLA computes it)."""
    attention = 12 * model.num_layers * model.num_heads * model.head_dim * seq_len
    return 6 * matmul_params(model) + attention


def model_flops_per_step(config: Config) -> float:
    tokens = config.train.global_batch_size * config.data.seq_len
    return flops_per_token(config.model, config.data.seq_len) * tokens


def matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
    """FLOPs of every matmul in a jaxpr (2 per multiply-add), each scan body counted as many times
    as it runs, so rematerialised forward passes and micro-batches are included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = math.prod(lhs_shape[dim] for dim in contracting)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeats * matmul_flops(inner)
    return total


class MetricsWriter:
    """Appends JSON lines to <run.dir>/metrics.jsonl and scalars to TensorBoard (process 0 only)."""

    def __init__(self, run_dir: Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


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


class StepProfiler:
    """Captures a jax.profiler trace (TensorBoard / Perfetto) of steps [first, last]."""

    def __init__(self, steps: Sequence[int], directory: Path):
        self.first, self.last = steps if steps else (0, -1)
        self.directory = directory
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
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
