"""Compile time of the train step against model depth: the scan over layers should keep it flat.

For each --layers depth and each layer mode (`scan`: model.scan_layers=true, the default;
`unrolled`: false, as the CPU configs set it), the config (with `model.num_layers` set to that
depth) is built with `jaxlm.training.setup.build_train`, and `jaxlm.training.setup.jit_train_step` is lowered and
compiled ahead of time on abstract inputs (jax.ShapeDtypeStruct carrying the state and batch
shardings): no parameter is ever allocated. Lowering (tracing to StableHLO) and compiling (XLA)
are timed apart. An untimed first compile takes the process's one-time start-up costs out of
the figures, and each (mode, depth) is timed --repeats times, interleaved, keeping the median.

compile_ratio = compile seconds of the deepest ÷ the shallowest with the scan (the target: ≤ 1.5
from 2 to 32); unrolled_compile_ratio, the same unrolled, shows what the scan saves.
Prints one JSON line to stdout; logs go to stderr.

    python bench/compile_time.py configs/tiny.yaml --layers 2 32
    python bench/compile_time.py configs/small_20m.yaml --layers 2 8 32 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from typing import Any

import jax
from report import report  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path

from jaxlm.config import Config, load_config
from jaxlm.training.setup import abstract_inputs, build_train, count_params, jit_train_step

log = logging.getLogger("jaxlm")


def time_compile(config: Config) -> dict[str, float]:
    """Seconds to lower and to compile one freshly built train step, and its parameter count."""
    setup = build_train(config)
    state, batch = abstract_inputs(config, setup)
    train_step = jit_train_step(config, setup)
    started = time.perf_counter()
    lowered = train_step.lower(state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
    return {
        "lower_s": lowered_at - started,
        "compile_s": compiled_at - lowered_at,
        "params": count_params(setup.abstract_state.params),
    }


def benchmark(
    config_path: str, overrides: list[str], depths: list[int], repeats: int, modes: list[str]
) -> dict[str, Any]:
    """Median lower and compile seconds per layer mode and depth; the figures of the JSON line."""
    scan_layers = {"scan": "true", "unrolled": "false"}
    configs = {
        (mode, depth): load_config(
            config_path, [*overrides, f"model.num_layers={depth}", f"model.scan_layers={scan_layers[mode]}"]
        )
        for mode in modes
        for depth in depths
    }
    time_compile(next(iter(configs.values())))  # untimed: the process's first compile pays one-time costs
    timings: dict[tuple[str, int], list[dict[str, float]]] = {key: [] for key in configs}
    for repeat in range(repeats):
        for (mode, depth), config in configs.items():
            timings[mode, depth].append(time_compile(config))
            log.info("repeat %d, %s, %d layers: %s", repeat + 1, mode, depth, timings[mode, depth][-1])
    layers: dict[str, dict[str, dict[str, float]]] = {mode: {} for mode in modes}
    for (mode, depth), runs in timings.items():
        layers[mode][str(depth)] = {
            "params": runs[0]["params"],
            "lower_s": statistics.median(run["lower_s"] for run in runs),
            "compile_s": statistics.median(run["compile_s"] for run in runs),
        }
    device = jax.devices()[0]
    figures = {
        "config": config_path,
        "overrides": overrides,
        "devices": {"count": jax.device_count(), "platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
        "repeats": repeats,
        "layers": layers,
    }
    for mode, per_depth in layers.items():
        shallowest, deepest = per_depth[str(min(depths))], per_depth[str(max(depths))]
        prefix = "" if mode == "scan" else "unrolled_"
        figures[f"{prefix}compile_ratio"] = deepest["compile_s"] / shallowest["compile_s"]
        figures[f"{prefix}lower_ratio"] = deepest["lower_s"] / shallowest["lower_s"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32], help="depths to compile")
    parser.add_argument("--repeats", type=int, default=3, help="timed compiles per depth (median kept)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["scan", "unrolled"],
        default=["scan", "unrolled"],
        help="layer modes to compile (model.scan_layers true / false)",
    )
    args = parser.parse_intermixed_args(argv)
    if args.repeats < 1 or min(args.layers) < 1:
        parser.error("--repeats and every --layers depth must be at least 1")
    return report(
        lambda: benchmark(args.config, args.overrides, sorted(set(args.layers)), args.repeats, args.modes)
    )


if __name__ == "__main__":
    sys.exit(main())
