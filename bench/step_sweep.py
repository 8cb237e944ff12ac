"""Throughput and MFU of the bare train step for several variants of one config: what to pick.

Each variant (config overrides, and environment variables such as XLA_FLAGS) runs in its own
process, so that one that runs out of memory or fails to compile is reported and the sweep goes
on. The process builds the train step `jaxlm train` runs (`jaxlm.training.setup.jit_train_step`), times
its compile, then runs it on one device-resident batch of random tokens (one document per row):
--warmup untimed steps, then --windows windows of train.log_every steps that block at their
end. Figures are the median window's. Peak device memory is the allocator's (GPU, TPU).

A variant is `NAME: key=value ... [env:VAR=value ...]`. Prints one JSON line per variant.

    python bench/step_sweep.py configs/llama_1b.yaml train.global_batch_size=8 train.micro_batches=1 \\
        --variant "cudnn: attention.kernel=cudnn" --variant "xla: attention.kernel=xla"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
from report import report  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path
from train_throughput import BareStep

from jaxlm.config import load_config
from jaxlm.training.metrics import model_flops_per_step, peak_flops_per_device


def measure_one(config_path: str, overrides: list[str], warmup: int, windows: int) -> dict[str, Any]:
    """The figures of one variant, in this process."""
    config = load_config(config_path, overrides)
    started = time.perf_counter()
    bare = BareStep(config)
    bare.state, metrics = bare.train_step(bare.state, bare.batch)  # compiles
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - started
    bare.run(warmup)
    timed = bare.measure(windows * config.train.log_every)
    seconds = timed["window_step_times_s"]
    bare.state, metrics = bare.train_step(bare.state, bare.batch)
    step_s = timed["step_time_s"]
    device = jax.devices()[0]
    tokens = config.train.global_batch_size * config.data.seq_len
    stats = device.memory_stats() or {}
    return {
        "devices": {"count": jax.device_count(), "kind": device.device_kind},
        "jax": jax.__version__,
        "params": bare.params,
        "tokens_per_step": tokens,
        "setup_and_compile_s": compile_s,
        "step_time_s": step_s,
        "step_time_range_s": [min(seconds), max(seconds)],
        "tokens_per_s": tokens / step_s,
        "mfu": model_flops_per_step(config)
        / step_s
        / (peak_flops_per_device(device, config) * jax.device_count()),
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "memory_limit_gib": stats.get("bytes_limit", 0) / 2**30,
        "first_loss": first_loss,
        "last_loss": float(metrics["loss"]),
    }


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    name, _, rest = text.partition(":")
    overrides, env = [], {}
    for token in rest.split():
        if token.startswith("env:"):
            var, _, value = token[4:].partition("=")
            env[var] = value
        else:
            overrides.append(token)
    return name.strip(), overrides, env


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    name, overrides, env = parse_variant(variant)
    command = [
        sys.executable, __file__, args.config, *args.overrides, *overrides, "--one",
        "--warmup", str(args.warmup), "--windows", str(args.windows),
    ]  # fmt: skip
    figures: dict[str, Any] = {"variant": name, "overrides": [*args.overrides, *overrides], "env": env}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        figures["error"] = f"timed out after {args.timeout} s"
        return figures
    figures["wall_s"] = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        figures.update(json.loads(lines[-1]))
    else:
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        key = [line for line in errors if "Error" in line or "error" in line]
        figures["error"] = (key or errors or ["no output"])[-1][:500]
        figures["returncode"] = done.returncode
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every variant")
    parser.add_argument("--variant", action="append", default=[], help="NAME: key=value ... [env:VAR=value]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the compiling one")
    parser.add_argument("--windows", type=int, default=3, help="timed windows of train.log_every steps")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one variant may take")
    parser.add_argument("--out", type=Path, help="also append each JSON line to this file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if args.one:
        return report(lambda: measure_one(args.config, args.overrides, args.warmup, args.windows))
    for variant in args.variant or ["default:"]:
        line = json.dumps(run_variant(args, variant))
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as out:
                out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
