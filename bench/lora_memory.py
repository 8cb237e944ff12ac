"""Memory of the train step with and without LoRA, from XLA's compiled memory analysis.

The config's train step (`jaxlm.training.setup.jit_train_step` on `build_train`'s shardings) is compiled
ahead of time on abstract inputs on one device, once as configured (every parameter trains) and
once per --ranks value with `optim.lora.rank=R` (the adapters train; the base is frozen). For
each it reports the trained parameter count, the train state's bytes (parameters, Adam moments),
XLA's argument, output and temporary bytes, and the step's peak: arguments + outputs − the
donated state they share + temporaries. Nothing is allocated or run. Prints one JSON line:

    python bench/lora_memory.py configs/llama_1b.yaml --ranks 16
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import jax
from report import (  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path
    compiled_memory,
    report,
)

from jaxlm.config import load_config
from jaxlm.model.lora import split_adapters
from jaxlm.parallel import bytes_per_device
from jaxlm.training.setup import abstract_inputs, build_train, count_params, jit_train_step

log = logging.getLogger("jaxlm")
GIB = 2**30


def measure(config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Compile the step on one device; its per-device bytes."""
    config = load_config(config_path, [*overrides, "mesh.fsdp=1", "mesh.data=1", "mesh.tensor=1"])
    setup = build_train(config, devices=jax.devices()[:1])
    state, batch = abstract_inputs(config, setup)
    memory = jit_train_step(config, setup).lower(state, batch).compile().memory_analysis()
    params, shardings = setup.abstract_state, setup.state_shardings
    trained = setup.model.trainable(params.params)[0]
    figures = compiled_memory(memory)
    return {
        "params": count_params(params.params),
        "trained_params": count_params(trained),
        "adapter_params": count_params(split_adapters(params.params)[0]),
        "param_bytes": bytes_per_device(params.params, shardings.params),
        "optimizer_bytes": bytes_per_device(params.opt_state, shardings.opt_state),
        **figures,
        "peak_gib": round(figures["peak_bytes"] / GIB, 2),
    }


def benchmark(config_path: str, overrides: list[str], ranks: list[int]) -> dict[str, Any]:
    """The step's memory without LoRA and with each rank, and what each rank saves."""
    variants = {"full": measure(config_path, overrides)}
    log.info("every parameter trained: %s", variants["full"])
    for rank in ranks:
        variants[f"lora_{rank}"] = measure(config_path, [*overrides, f"optim.lora.rank={rank}"])
        log.info("LoRA rank %d: %s", rank, variants[f"lora_{rank}"])
    full = variants["full"]
    for figures in variants.values():
        figures["peak_saved_gib"] = round((full["peak_bytes"] - figures["peak_bytes"]) / GIB, 2)
        figures["peak_ratio"] = round(figures["peak_bytes"] / full["peak_bytes"], 4)
    device = jax.devices()[0]
    return {
        "config": config_path,
        "overrides": overrides,
        "device": {"platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
        "variants": variants,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16], help="LoRA ranks to compare")
    args = parser.parse_intermixed_args(argv)
    if min(args.ranks) < 1:
        parser.error("every --ranks value must be at least 1")
    return report(lambda: benchmark(args.config, args.overrides, sorted(set(args.ranks))))


if __name__ == "__main__":
    sys.exit(main())
