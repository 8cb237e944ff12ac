"""The MFU counter's FLOPs against the FLOPs XLA's cost analysis counts in the compiled train step.

Three counts of one train step (jaxlm.train.jit_train_step, compiled for one device):

- model_flops: `jaxlm.metrics.model_flops_per_step(config)`, what MFU divides by peak.
- xla_flops: the "flops" of `compiled.cost_analysis()`. XLA counts a while loop's body once,
  whatever its trip count, so the step is compiled with every `jax.lax.scan` fully unrolled
  (the same computation without loops) for this count. The count of the step as it is
  normally compiled, its loop bodies counted once each, is reported as xla_flops_loop_once.
- matmul_flops: 2·M·N·K summed over every dot_general of the traced step (the bodies of scans
  times their length): the matmul part of xla_flops. xla_flops − matmul_flops is elementwise
  work (norms, softmax, rotary, AdamW) that the counter leaves out.

relative_difference = model_flops ÷ xla_flops − 1 (the target: within ±10%).
Prints one JSON line to stdout; logs go to stderr.

    python bench/flops_check.py configs/tiny.yaml
    python bench/flops_check.py configs/small_20m.yaml
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
from compile_time import abstract_batch  # a sibling script: `python bench/...` puts bench/ on sys.path

from jaxlm.checkpoint import abstract_with_shardings
from jaxlm.cli import setup_logging
from jaxlm.config import load_config
from jaxlm.errors import UserError
from jaxlm.metrics import model_flops_per_step
from jaxlm.train import build, count_params, jit_train_step

log = logging.getLogger("jaxlm")


def matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
    """2·M·N·K of every dot_general, looking into nested jaxprs; scan bodies count `length` times."""
    total = 0.0
    for equation in jaxpr.eqns:
        if equation.primitive.name == "dot_general":
            lhs, rhs = (variable.aval.shape for variable in equation.invars)
            (_, rhs_contracting), (_, rhs_batch) = equation.params["dimension_numbers"]
            rhs_free = [size for axis, size in enumerate(rhs) if axis not in (*rhs_contracting, *rhs_batch)]
            total += 2 * math.prod(lhs) * math.prod(rhs_free)
        repeats = equation.params.get("length", 1) if equation.primitive.name == "scan" else 1
        for value in equation.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    total += repeats * matmul_flops(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    total += repeats * matmul_flops(inner)
    return total


def compile_with_scans_unrolled(train_step: Callable, state: Any, batch: Any) -> jax.stages.Compiled:
    """Compile a jitted step with every `jax.lax.scan` in it fully unrolled: no while loops.

    jaxlm calls `jax.lax.scan` by attribute at trace time, so patching it reaches the model."""
    unrolled_scan = functools.partial(jax.lax.scan, unroll=True)
    with mock.patch("jax.lax.scan", unrolled_scan):
        return train_step.lower(state, batch).compile()


def benchmark(config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Count the step's FLOPs three ways; the figures of the JSON line."""
    config = load_config(config_path, overrides)
    setup = build(config, devices=jax.devices()[:1])
    state = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    batch = abstract_batch(config, setup)

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
        "params": count_params(setup.abstract_state),
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
    setup_logging()
    try:
        result = benchmark(args.config, args.overrides)
    except UserError as error:
        print(f"flops_check: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
