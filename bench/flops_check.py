"""The MFU counter's FLOPs against the FLOPs XLA's cost analysis counts in the compiled train step.

Three counts of one train step (jaxlm.training.train.jit_train_step, compiled for one device):

- model_flops: `jaxlm.training.metrics.model_flops_per_step(config)`, what MFU divides by peak.
- xla_flops: the "flops" of `compiled.cost_analysis()`. XLA counts a while loop's body once,
  whatever its trip count, so the step is compiled with every `jax.lax.scan` fully unrolled
  (the same computation without loops) for this count. The count of the step as it is
  normally compiled, its loop bodies counted once each, is reported as xla_flops_loop_once.
- matmul_flops: `jaxlm.training.metrics.matmul_flops`, the count `jaxlm plan` uses: 2·M·N·K over every
  dot_general of the traced step, scan bodies times their length. It is the matmul part of
  xla_flops; xla_flops − matmul_flops is elementwise work (norms, softmax, rotary, AdamW) that
  the counter leaves out.

relative_difference = model_flops ÷ xla_flops − 1 (the target: within ±10%).
Prints one JSON line to stdout; logs go to stderr.

    python bench/flops_check.py configs/tiny.yaml
    python bench/flops_check.py configs/small_20m.yaml
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
from report import report  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path

from jaxlm.config import load_config
from jaxlm.training.metrics import matmul_flops, model_flops_per_step
from jaxlm.training.setup import abstract_inputs, build_train, count_params, jit_train_step

log = logging.getLogger("jaxlm")


def compile_with_scans_unrolled(train_step: Callable, state: Any, batch: Any) -> jax.stages.Compiled:
    """Compile a jitted step with every `jax.lax.scan` in it fully unrolled: no while loops.

    jaxlm calls `jax.lax.scan` by attribute at trace time, so patching it reaches the model."""
    unrolled_scan = functools.partial(jax.lax.scan, unroll=True)
    with mock.patch("jax.lax.scan", unrolled_scan):
        return train_step.lower(state, batch).compile()


def benchmark(config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Count the step's FLOPs three ways; the figures of the JSON line."""
    config = load_config(config_path, overrides)
    setup = build_train(config, devices=jax.devices()[:1])
    state, batch = abstract_inputs(config, setup)

    traced = jit_train_step(config, setup).trace(state, batch)
    loop_once = traced.lower().compile().cost_analysis()
    unrolled = compile_with_scans_unrolled(jit_train_step(config, setup), state, batch).cost_analysis()
    log.info("compiled the step with its scans kept and unrolled")

    model_flops = model_flops_per_step(config)
    xla_flops = unrolled["flops"]
    matmuls = matmul_flops(traced.jaxpr.jaxpr)
    return {
        "config": config_path,
        "overrides": overrides,
        "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind},
        "jax": jax.__version__,
        "params": count_params(setup.abstract_state.params),
        "num_layers": config.model.num_layers,
        "tokens_per_step": config.train.global_batch_size * config.data.seq_len,
        "model_flops": model_flops,
        "xla_flops": xla_flops,
        "xla_flops_loop_once": loop_once["flops"],
        "matmul_flops": matmuls,
        "relative_difference": model_flops / xla_flops - 1,
        "matmul_relative_difference": model_flops / matmuls - 1,
        "elementwise_share": 1 - matmuls / xla_flops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    return report(lambda: benchmark(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
