"""Training throughput of the whole framework against the bare jitted step, for one config.

- train: `jaxlm.train.train` for --steps steps in a fresh temporary run dir, with the config's own
  logging, eval and checkpoint cadence. Step time is the median of the windows the framework logs
  to metrics.jsonl, leaving out the first (the framework already leaves eval time out of them).
  Wall time runs from the end of the first (compiling) step to the return of `train`: data, eval,
  checkpoints and the final wait for the async save all included.
- bare: the same jitted train step (`jaxlm.train.jit_train_step`, as the loop uses it), on one
  device-resident batch of random tokens, after --warmup untimed calls. Timed in windows of
  train.log_every steps that block only at their end, as the framework's logging does.

overhead_ratio = train tokens/s ÷ bare tokens/s: 1.0 means the framework costs nothing per step.
Prints one JSON line to stdout; logs go to stderr.

    python bench/train_throughput.py configs/tiny.yaml --steps 100
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/train_throughput.py configs/tiny.yaml --steps 100
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from report import report  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path

from jaxlm.config import Config, load_config
from jaxlm.data import pipeline
from jaxlm.errors import UserError
from jaxlm.metrics import model_flops_per_step, peak_flops_per_device
from jaxlm.train import build, count_params, jit_train_step, train

log = logging.getLogger("jaxlm")


class _FirstStepClock(logging.Handler):
    """Notes when `train` logs that its first (compiling) step is done: `train` has no timing hook."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.at is None and record.getMessage().startswith("first step"):
            self.at = time.perf_counter()


def measure_train(config: Config) -> dict[str, float]:
    """Per-step seconds of the full framework: median logged window, and steady-state wall time."""
    clock = _FirstStepClock()
    log.addHandler(clock)
    try:
        train(config)
        finished = time.perf_counter()
    finally:
        log.removeHandler(clock)
    if clock.at is None:
        raise RuntimeError("jaxlm.train no longer logs 'first step ...'; update _FirstStepClock")
    records = [json.loads(line) for line in (Path(config.run.dir) / "metrics.jsonl").open()]
    windows = [record for record in records if "loss" in record][1:]  # eval lines have eval_loss
    return {
        "step_time_s": statistics.median(window["step_time_s"] for window in windows),
        "mfu": statistics.median(window["mfu"] for window in windows),
        "wall_step_time_s": (finished - clock.at) / (config.train.steps - 1),
    }


def random_batch(config: Config) -> pipeline.Batch:
    """This process's rows of one batch of random tokens, each row a single document."""
    rows = config.train.global_batch_size // jax.process_count()
    seq_len = config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (rows, seq_len + 1), np.int32)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
    }


def measure_bare(config: Config, warmup: int) -> dict[str, float]:
    """Per-step seconds of the jitted train step alone: median window and mean over all steps."""
    setup = build(config)
    train_step = jit_train_step(config, setup)  # the very step `jaxlm train` runs
    state = setup.init(jax.random.key(config.train.seed))
    batch = pipeline.to_global(random_batch(config), setup.batch_sharding)
    for _ in range(warmup):  # the first call compiles
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)

    window_seconds, window_steps = [], []
    for first in range(0, config.train.steps, config.train.log_every):
        steps = min(config.train.log_every, config.train.steps - first)
        started = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        window_seconds.append(time.perf_counter() - started)
        window_steps.append(steps)
    return {
        "step_time_s": statistics.median(s / n for s, n in zip(window_seconds, window_steps, strict=True)),
        "wall_step_time_s": sum(window_seconds) / sum(window_steps),
        "params": count_params(setup.abstract_state),
    }


def benchmark(config_path: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Measure the framework and the bare step on one config; the figures of the JSON line."""
    with tempfile.TemporaryDirectory(prefix="jaxlm-bench-") as run_dir:
        # A fresh run dir and default checkpoint dir, so the run can never resume an old one.
        forced = [f"train.steps={steps}", f"run.dir={run_dir}", "checkpoint.dir=null"]
        config = load_config(config_path, [*overrides, *forced])
        if steps < 2 * config.train.log_every:
            raise UserError(
                f"--steps={steps} logs fewer than two windows of train.log_every={config.train.log_every}; "
                f"use --steps {2 * config.train.log_every} or more"
            )
        framework = measure_train(config)
    bare = measure_bare(config, warmup)

    device = jax.devices()[0]
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    peak_flops = peak_flops_per_device(device, config) * jax.device_count()
    return {
        "config": config_path,
        "overrides": overrides,
        "devices": {"count": jax.device_count(), "platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
        "steps": steps,
        "global_batch_size": config.train.global_batch_size,
        "seq_len": config.data.seq_len,
        "params": bare["params"],
        "train_tokens_per_s": tokens_per_step / framework["step_time_s"],
        "train_step_time_s": framework["step_time_s"],
        "train_wall_tokens_per_s": tokens_per_step / framework["wall_step_time_s"],
        "bare_tokens_per_s": tokens_per_step / bare["step_time_s"],
        "bare_step_time_s": bare["step_time_s"],
        "bare_wall_tokens_per_s": tokens_per_step / bare["wall_step_time_s"],
        "overhead_ratio": bare["step_time_s"] / framework["step_time_s"],
        "wall_overhead_ratio": bare["wall_step_time_s"] / framework["wall_step_time_s"],
        "mfu": framework["mfu"],
        "bare_mfu": model_flops_per_step(config) / bare["step_time_s"] / peak_flops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed bare steps; the first compiles")
    args = parser.parse_intermixed_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first call compiles")
    return report(lambda: benchmark(args.config, args.overrides, args.steps, args.warmup))


if __name__ == "__main__":
    sys.exit(main())
