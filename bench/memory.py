"""Per-device memory of parameters + optimizer state under FSDP on 1, 2, 4, 8 devices.

For each --devices count N, the config is built with `mesh.fsdp=N mesh.data=1 mesh.tensor=1` on
the first N devices (`jaxlm.training.setup.build_train(config, devices=jax.devices()[:N])`), and the jitted
train step (`jaxlm.training.setup.jit_train_step`) is compiled ahead of time on abstract inputs. Two
figures of the state per device come out, which should agree:

- state_bytes: the sum over the train state's leaves of one device's shard (the shard shape of
  each leaf's sharding, times its item size): parameters, Adam moments, step and counts.
- argument_bytes: what XLA's `compiled.memory_analysis()` reports for the step's arguments on
  one device, minus the batch's shard (4 int32 fields), so it measures the same state.

state_ratio = state_bytes(N) ÷ state_bytes(1); FSDP should make it 1/N. temp_bytes (XLA's
scratch for activations and gathered weights) is reported alongside: FSDP does not shard it.
Prints one JSON line to stdout; logs go to stderr. Needs N host devices on a CPU:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/memory.py configs/tiny.yaml --devices 1 2 4 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import jax
from report import report  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path

from jaxlm.config import load_config
from jaxlm.errors import UserError
from jaxlm.parallel import bytes_per_device
from jaxlm.training.setup import abstract_inputs, build_train, count_params, jit_train_step

log = logging.getLogger("jaxlm")


def measure(config_path: str, overrides: list[str], device_count: int) -> dict[str, Any]:
    """Compile the train step with FSDP over `device_count` devices; its per-device bytes."""
    mesh_overrides = [f"mesh.fsdp={device_count}", "mesh.data=1", "mesh.tensor=1"]
    config = load_config(config_path, [*overrides, *mesh_overrides])
    setup = build_train(config, devices=jax.devices()[:device_count])
    state, batch = abstract_inputs(config, setup)
    memory = jit_train_step(config, setup).lower(state, batch).compile().memory_analysis()
    batch_bytes = bytes_per_device(batch, {field: setup.batch_sharding for field in batch})
    return {
        "params": count_params(setup.abstract_state.params),
        "param_bytes": bytes_per_device(setup.abstract_state.params, setup.state_shardings.params),
        "optimizer_bytes": bytes_per_device(setup.abstract_state.opt_state, setup.state_shardings.opt_state),
        "state_bytes": bytes_per_device(setup.abstract_state, setup.state_shardings),
        "argument_bytes": memory.argument_size_in_bytes - batch_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
    }


def benchmark(config_path: str, overrides: list[str], device_counts: list[int]) -> dict[str, Any]:
    """Per-device bytes for each device count, and their ratios to one device."""
    available = jax.device_count()
    if max(device_counts) > available:
        raise UserError(
            f"--devices {max(device_counts)} needs that many devices but there are {available}; "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={max(device_counts)} on a CPU"
        )
    per_count = {}
    for count in device_counts:
        per_count[count] = measure(config_path, overrides, count)
        log.info("%d devices: %s", count, per_count[count])
    first = per_count[device_counts[0]]
    for count, figures in per_count.items():
        figures["state_ratio"] = figures["state_bytes"] / first["state_bytes"]
        figures["argument_ratio"] = figures["argument_bytes"] / first["argument_bytes"]
        figures["ideal_ratio"] = device_counts[0] / count
    device = jax.devices()[0]
    return {
        "config": config_path,
        "overrides": overrides,
        "devices": {"count": available, "platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
        "fsdp": {str(count): figures for count, figures in per_count.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="FSDP device counts")
    args = parser.parse_intermixed_args(argv)
    if min(args.devices) < 1:
        parser.error("every --devices count must be at least 1")
    return report(lambda: benchmark(args.config, args.overrides, sorted(set(args.devices))))


if __name__ == "__main__":
    sys.exit(main())
