"""Training throughput of the whole framework against the bare jitted step, for one config.

- train: `jaxlm.training.train.train` for --steps steps in a fresh temporary run dir, at the config's own
  logging, eval and checkpoint cadence. Wall time runs from the end of the first step (both
  steps compile before it; `train` returns when that was) to the return of `train`: host batches, metrics, evals, checkpoint
  saves and the final wait for the last asynchronous save are all in it. The step time of the
  windows the framework logs (which leave eval time out) is reported too.
- bare: the same jitted train step (`jaxlm.training.setup.jit_train_step`, as the loop uses it) on one
  device-resident batch of random tokens, in windows of train.log_every steps that block only
  at their end, as the framework's logging does.

The bare step first runs --warmup untimed steps (a fresh process runs its first ~100 steps
slower), then --repeats rounds. Each round times half the bare steps, the framework, then the
other half, so the bare figure brackets the framework run in time and load from elsewhere or
drift falls on both alike; every figure is the median over rounds.

overhead_ratio = bare wall time per step ÷ train wall time per step: 1.0 means the framework,
evals and checkpoints included, costs nothing. loop_overhead_ratio leaves out the final wait for
the last checkpoint's background write (which a longer run overlaps with training: with a large
state in a short run it dominates). step_overhead_ratio is the same from median windows (no
evals). Prints one JSON line to stdout; logs go to stderr.

    python bench/train_throughput.py configs/tiny.yaml --steps 300
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/train_throughput.py configs/tiny.yaml --steps 300
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
from jaxlm.training.metrics import model_flops_per_step, peak_flops_per_device
from jaxlm.training.setup import build_train, count_params, jit_train_step
from jaxlm.training.train import train

log = logging.getLogger("jaxlm")


def measure_train(config: Config) -> dict[str, float]:
    """Per-step seconds of the full framework: steady-state wall time, and median logged window."""
    result = train(config)
    finished = time.perf_counter()
    records = [json.loads(line) for line in (Path(config.run.dir) / "metrics.jsonl").open()]
    windows = [record for record in records if "loss" in record][1:]  # eval lines have eval_loss
    return {
        "wall_step_time_s": (finished - result.first_step_done_at) / (config.train.steps - 1),
        "loop_step_time_s": (result.loop_done_at - result.first_step_done_at) / (config.train.steps - 1),
        "step_time_s": statistics.median(window["step_time_s"] for window in windows),
        "mfu": statistics.median(window["mfu"] for window in windows),
    }


def random_batch(config: Config) -> pipeline.Batch:
    """This process's rows of one batch of random tokens, each row a single document."""
    rows = config.train.global_batch_size // jax.process_count()
    seq_len = config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (rows, seq_len + 1), np.int32)
    return {
        "tokens": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "loss_mask": np.ones((rows, seq_len), np.int32),
    }


class BareStep:
    """The jitted train step `jaxlm train` runs, looping on one device-resident batch."""

    def __init__(self, config: Config):
        self.config = config
        setup = build_train(config)
        self.params = count_params(setup.abstract_state.params)
        self.train_step = jit_train_step(config, setup)
        self.state = setup.init(jax.random.key(config.train.seed))
        self.batch = pipeline.to_global(random_batch(config), setup.batch_sharding)

    def run(self, steps: int) -> None:
        """`steps` steps, dispatched ahead as the loop dispatches them, waited for at the end."""
        for _ in range(steps):
            self.state, metrics = self.train_step(self.state, self.batch)
        jax.block_until_ready(metrics)

    def measure(self, steps: int) -> dict[str, Any]:
        """Per-step seconds over `steps` steps in windows of train.log_every: median window, mean
        over all steps, and each window's."""
        log_every = self.config.train.log_every
        window_seconds, window_steps = [], []
        for first in range(0, steps, log_every):
            window = min(log_every, steps - first)
            started = time.perf_counter()
            self.run(window)
            window_seconds.append(time.perf_counter() - started)
            window_steps.append(window)
        window_step_times = [s / n for s, n in zip(window_seconds, window_steps, strict=True)]
        return {
            "wall_step_time_s": sum(window_seconds) / sum(window_steps),
            "step_time_s": statistics.median(window_step_times),
            "window_step_times_s": window_step_times,
            "steps": steps,
        }


def _combine(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    """One bare-step measurement from two (`BareStep.measure`), weighting each by its steps."""
    if first is None:
        return second
    windows = first["window_step_times_s"] + second["window_step_times_s"]
    seconds = first["wall_step_time_s"] * first["steps"] + second["wall_step_time_s"] * second["steps"]
    steps = first["steps"] + second["steps"]
    return {
        "wall_step_time_s": seconds / steps,
        "step_time_s": statistics.median(windows),
        "window_step_times_s": windows,
        "steps": steps,
    }


def benchmark(
    config_path: str,
    overrides: list[str],
    steps: int,
    warmup: int,
    repeats: int,
    bare_steps: int | None = None,
) -> dict[str, Any]:
    """Rounds of framework then bare step on one config; the figures of the JSON line."""
    config = load_config(config_path, [*overrides, f"train.steps={steps}"])
    if steps < 2 * config.train.log_every:
        raise UserError(
            f"--steps={steps} logs fewer than two windows of train.log_every={config.train.log_every}; "
            f"use --steps {2 * config.train.log_every} or more"
        )
    bare = BareStep(config)
    bare.measure(1 + warmup)  # untimed; the first call compiles
    log.info("bare step compiled and warmed up (%d steps)", warmup)
    bare_steps = bare_steps or steps
    rounds = []
    for round_index in range(repeats):
        bare_before = bare.measure(bare_steps // 2) if bare_steps > 1 else None
        with tempfile.TemporaryDirectory(prefix="jaxlm-bench-") as run_dir:
            # A fresh run dir and default checkpoint dir, so the run can never resume an old one.
            run_config = load_config(
                config_path, [*overrides, f"train.steps={steps}", f"run.dir={run_dir}", "checkpoint.dir=null"]
            )
            framework = measure_train(run_config)
        bare_figures = _combine(bare_before, bare.measure(bare_steps - bare_steps // 2))
        rounds.append(
            {
                "overhead_ratio": bare_figures["wall_step_time_s"] / framework["wall_step_time_s"],
                "loop_overhead_ratio": bare_figures["wall_step_time_s"] / framework["loop_step_time_s"],
                "step_overhead_ratio": bare_figures["step_time_s"] / framework["step_time_s"],
                "train_wall_step_time_s": framework["wall_step_time_s"],
                "train_step_time_s": framework["step_time_s"],
                "bare_wall_step_time_s": bare_figures["wall_step_time_s"],
                "bare_step_time_s": bare_figures["step_time_s"],
                "mfu": framework["mfu"],
            }
        )
        log.info("round %d of %d: %s", round_index + 1, repeats, rounds[-1])

    def median(key: str) -> float:
        return statistics.median(figures[key] for figures in rounds)

    device = jax.devices()[0]
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    peak_flops = peak_flops_per_device(device, config) * jax.device_count()
    return {
        "config": config_path,
        "overrides": overrides,
        "devices": {"count": jax.device_count(), "platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
        "steps": steps,
        "bare_steps": bare_steps,
        "repeats": repeats,
        "global_batch_size": config.train.global_batch_size,
        "seq_len": config.data.seq_len,
        "params": bare.params,
        "eval_every": config.train.eval_every,
        "checkpoint_every": config.checkpoint.every,
        "overhead_ratio": median("overhead_ratio"),
        "loop_overhead_ratio": median("loop_overhead_ratio"),
        "step_overhead_ratio": median("step_overhead_ratio"),
        "train_wall_tokens_per_s": tokens_per_step / median("train_wall_step_time_s"),
        "bare_wall_tokens_per_s": tokens_per_step / median("bare_wall_step_time_s"),
        "train_tokens_per_s": tokens_per_step / median("train_step_time_s"),
        "bare_tokens_per_s": tokens_per_step / median("bare_step_time_s"),
        "mfu": median("mfu"),
        "bare_mfu": model_flops_per_step(config) / median("bare_step_time_s") / peak_flops,
        "rounds": [
            {key: figures[key] for key in ("overhead_ratio", "loop_overhead_ratio", "step_overhead_ratio")}
            for figures in rounds
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--steps", type=int, default=300, help="steps of each timed run")
    parser.add_argument(
        "--bare-steps",
        type=int,
        help="steps of each bare-step run (default --steps); fewer keep a long run at a real "
        "checkpoint cadence affordable, as the bare step's time per step does not drift",
    )
    parser.add_argument("--warmup", type=int, default=100, help="untimed bare steps before the first round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of framework then bare (median kept)")
    args = parser.parse_intermixed_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be at least 0 and --repeats at least 1")
    if args.bare_steps is not None and args.bare_steps < 1:
        parser.error("--bare-steps must be at least 1")
    return report(
        lambda: benchmark(args.config, args.overrides, args.steps, args.warmup, args.repeats, args.bare_steps)
    )


if __name__ == "__main__":
    sys.exit(main())
