"""What each remat policy costs on one config: compiled memory, bytes kept per layer for the
backward pass, recomputed FLOPs and step time.

For each policy (`model.remat=P`; every preset of `jaxlm.model.remat.PRESETS` but `custom` by
default, or --policies), the train step `jaxlm train` runs (`jaxlm.training.setup.jit_train_step`) is
traced and compiled on one device (mesh.fsdp=1), and one JSON line is printed:

- memory: XLA's `compiled.memory_analysis()`: arguments (train state and batch), outputs,
  temporaries, and the peak: arguments + outputs − the donated state they share + temporaries.
  On a CPU this is XLA:CPU's buffer assignment, a proxy for a TPU's or GPU's.
- saved_bytes_per_layer: what one layer keeps for the backward pass, exactly, from JAX's
  saved-residuals analysis (`jax._src.ad_checkpoint.saved_residuals`, what
  `jax.ad_checkpoint.print_saved_residuals` prints) of the model's loss, layers unrolled. It is
  the difference between a 2-layer and a 1-layer model (one layer's residuals, its input
  included), at the config's batch and at twice its rows: the residuals that grow with the batch
  are activations, and the rest (each layer's weights, which every policy keeps) drops out.
  offloaded_bytes_per_layer is the part kept in host memory (model.remat_offload), and
  saved_by_name the bytes of the residuals the analysis calls by an activation's name (the rest
  are unnamed: the layer's input, softmax, SiLU, rotary, norm statistics; where a saved tensor is
  an op's output read after a name, as often under `none`, it counts as unnamed).
- flops_ratio: `jaxlm.training.metrics.matmul_flops` of the traced step (recomputed forward passes
  included) ÷ `jaxlm.training.metrics.model_flops_per_step`: 1.0 for no recomputation.
- step_time_s: the median of the compiled step's times, each step waited for, on one batch of
  random tokens: every policy is compiled first, then --rounds rounds each run every policy in
  turn (--warmup untimed steps then --steps timed ones, from the same fresh state), so that load
  from elsewhere falls on all alike. last_loss, the last step's loss, is the same under every
  policy. --steps 0: memory and FLOPs only, nothing allocated.

Overrides model.remat_save=[...] and model.remat_offload=[...] define the `custom` policy (and
add it to the default list); the other policies run without them. Prints one JSON line per
policy at the end (a policy that fails to compile or run gets one with its error); logs go to
stderr.

    python bench/remat.py configs/tiny.yaml --rounds 3
    python bench/remat.py configs/llama_1b.yaml train.global_batch_size=16 train.micro_batches=1 \\
        train.loss_chunk=512 --steps 0
    python bench/remat.py configs/llama_1b.yaml train.global_batch_size=1 data.seq_len=256 \\
        train.micro_batches=1 model.param_dtype=bfloat16 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # the analysis print_saved_residuals prints
from report import compiled_memory  # bench/report.py: on sys.path, as train_throughput
from train_throughput import random_batch  # bench/: `python bench/<script>.py` puts it on sys.path

from jaxlm.cli import setup_logging
from jaxlm.config import Config, load_config
from jaxlm.data import pipeline
from jaxlm.errors import UserError
from jaxlm.model import remat
from jaxlm.training.metrics import matmul_flops, model_flops_per_step
from jaxlm.training.setup import (
    TrainSetup,
    abstract_inputs,
    build_model,
    build_train,
    count_params,
    jit_train_step,
)
from jaxlm.training.step import TrainState, next_token_loss

log = logging.getLogger("jaxlm")
GIB = 2**30
CUSTOM_KEYS = ("model.remat_save=", "model.remat_offload=")
ONE_DEVICE = ["mesh.fsdp=1", "mesh.data=1", "mesh.tensor=1"]


def policy_config(config_path: str, overrides: list[str], policy: str, *extra: str) -> Config:
    """The config with model.remat=policy; the custom policy's lists only for `custom`."""
    common = [override for override in overrides if not override.startswith(CUSTOM_KEYS)]
    custom = [override for override in overrides if override.startswith(CUSTOM_KEYS)]
    chosen = custom if policy == "custom" else ["model.remat_save=[]", "model.remat_offload=[]"]
    return load_config(config_path, [*common, *ONE_DEVICE, f"model.remat={policy}", *chosen, *extra])


def residual_bytes(config: Config) -> dict[str, int]:
    """Bytes of every residual the backward pass of the model's loss keeps, by memory space
    ("device", "host") and, in device memory, by activation name ("named:<name>")."""
    setup = build_model(config, devices=jax.devices()[:1])
    rows, length = config.train.global_batch_size, config.data.seq_len
    batch = {field: jax.ShapeDtypeStruct((rows, length), jnp.int32) for field in pipeline.FIELDS}

    def loss(params, batch):
        model = nnx.merge(setup.graphdef, params)
        hidden = model(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True).hidden
        return next_token_loss(hidden, model.output_head(), batch["targets"], batch["loss_mask"])[0]

    totals: dict[str, int] = {"device": 0, "host": 0}
    for aval, where in saved_residuals(loss, setup.abstract_params, batch):
        size = aval.size * aval.dtype.itemsize
        space = "host" if getattr(aval, "memory_space", None) == jax.memory.Space.Host else "device"
        totals[space] += size
        if space == "device" and where.startswith("named '"):
            key = "named:" + where.split("'")[1]
            totals[key] = totals.get(key, 0) + size
    return totals


def saved_per_layer(config_path: str, overrides: list[str], policy: str, rows: int) -> dict[str, Any]:
    """One layer's residuals that grow with the batch (activations, not weights), at `rows` rows:
    (2 layers − 1 layer) at 2·rows minus the same at rows."""

    def one_layer(rows: int) -> dict[str, int]:
        counts = []
        for layers in (1, 2):
            extra = (
                "model.scan_layers=false",
                f"model.num_layers={layers}",
                f"train.global_batch_size={rows}",
            )
            counts.append(residual_bytes(policy_config(config_path, overrides, policy, *extra)))
        return {
            key: counts[1].get(key, 0) - counts[0].get(key, 0) for key in counts[0].keys() | counts[1].keys()
        }

    single, double = one_layer(rows), one_layer(2 * rows)
    per_layer = {key: double.get(key, 0) - single.get(key, 0) for key in single.keys() | double.keys()}
    return {
        "saved_bytes_per_layer": per_layer["device"],
        "offloaded_bytes_per_layer": per_layer["host"],
        "saved_by_name": {
            key.removeprefix("named:"): size
            for key, size in sorted(per_layer.items())
            if key.startswith("named:")
        },
    }


def memory_figures(compiled: jax.stages.Compiled) -> dict[str, Any]:
    """The compiled step's memory (`report.compiled_memory`), its host temporaries and peak in GiB."""
    memory = compiled.memory_analysis()
    figures = compiled_memory(memory)
    return {
        **figures,
        "host_temp_bytes": memory.host_temp_size_in_bytes,
        "peak_gib": round(figures["peak_bytes"] / GIB, 3),
    }


@dataclass
class Program:
    """One policy's compiled train step, and what it runs on."""

    config: Config
    setup: TrainSetup
    compiled: jax.stages.Compiled


def analyse(config_path: str, overrides: list[str], policy: str) -> tuple[dict[str, Any], Program]:
    """Compile one policy's step: its memory, saved bytes and FLOPs, and the program to time."""
    config = policy_config(config_path, overrides, policy)
    setup = build_train(config, devices=jax.devices()[:1])
    started = time.perf_counter()
    traced = jit_train_step(config, setup).trace(*abstract_inputs(config, setup))
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - started
    log.info("model.remat=%s: compiled in %.1f s", policy, compile_s)
    model_flops = model_flops_per_step(config)
    chosen = remat.preset(policy, config.model.remat_save, config.model.remat_offload)
    figures: dict[str, Any] = {
        "policy": policy,
        "keeps": chosen.summary,
        "params": count_params(setup.abstract_state.params),
        "num_layers": config.model.num_layers,
        "scan_layers": config.model.scan_layers,
        "tokens_per_step": config.train.global_batch_size * config.data.seq_len,
        **memory_figures(compiled),
        **saved_per_layer(config_path, overrides, policy, config.train.global_batch_size),
        "model_flops": model_flops,
        "matmul_flops": matmul_flops(traced.jaxpr.jaxpr),
        "compile_s": compile_s,
    }
    figures["flops_ratio"] = figures["matmul_flops"] / model_flops
    return figures, Program(config, setup, compiled)


def step_times(program: Program, state: TrainState, warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each of `steps` steps from `state` on one batch of random tokens, after `warmup`
    untimed ones, and the last step's loss."""
    batch = pipeline.to_global(random_batch(program.config), program.setup.batch_sharding)
    seconds = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        state, metrics = program.compiled(state, batch)
        jax.block_until_ready(metrics)
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    return seconds, float(metrics["loss"])


def time_rounds(programs: dict[str, Program], rounds: int, warmup: int, steps: int) -> dict[str, dict]:
    """Each policy's step times over `rounds` rounds that visit every policy in turn, so that load
    from elsewhere falls on all alike; each run starts from the same fresh state."""
    init = next(iter(programs.values())).setup.init  # one init for all: a policy changes the step only
    seconds: dict[str, list[float]] = {policy: [] for policy in programs}
    timed: dict[str, dict] = {}
    for round_index in range(rounds):
        for policy, program in programs.items():
            if "error" in timed.get(policy, {}):
                continue
            try:
                times, loss = step_times(
                    program, init(jax.random.key(program.config.train.seed)), warmup, steps
                )
            except jax.errors.JaxRuntimeError as error:
                timed[policy] = {"error": str(error).strip().splitlines()[0][:500]}
                continue
            seconds[policy] += times
            tokens = program.config.train.global_batch_size * program.config.data.seq_len
            step_s = statistics.median(seconds[policy])
            timed[policy] = {
                "step_time_s": step_s,
                "step_times_s": seconds[policy],
                "tokens_per_s": tokens / step_s,
                "last_loss": loss,
            }
        log.info("round %d of %d timed", round_index + 1, rounds)
    return timed


def policies_to_run(chosen: str | None, overrides: list[str]) -> list[str]:
    """--policies, else every preset but custom (and custom when its lists are given)."""
    if chosen:
        names = [name.strip() for name in chosen.split(",") if name.strip()]
        unknown = [name for name in names if name not in remat.PRESETS]
        if unknown:
            raise UserError(
                f"--policies {','.join(unknown)}: not a remat policy; use some of {','.join(remat.PRESETS)}"
            )
        return names
    custom = any(override.startswith(CUSTOM_KEYS) for override in overrides)
    return [name for name in remat.PRESETS if name != "custom" or custom]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--policies", help="comma-separated remat policies (default: every preset)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per policy (0: compile only)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of timing every policy in turn")
    parser.add_argument("--out", type=Path, help="also append each JSON line to this file")
    args = parser.parse_intermixed_args(argv)
    if args.steps < 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --warmup must be at least 0, --rounds at least 1")
    setup_logging()
    device = jax.devices()[0]
    common = {
        "config": args.config,
        "overrides": args.overrides,
        "device": {"platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
    }
    figures: dict[str, dict] = {}
    programs: dict[str, Program] = {}
    try:
        for policy in policies_to_run(args.policies, args.overrides):
            try:
                figures[policy], programs[policy] = analyse(args.config, args.overrides, policy)
            except (jax.errors.JaxRuntimeError, NotImplementedError, ValueError) as error:
                figures[policy] = {"policy": policy, "error": str(error).strip().splitlines()[0][:500]}
    except UserError as error:
        print(f"remat: error: {error}", file=sys.stderr)
        return 2
    timed = time_rounds(programs, args.rounds, args.warmup, args.steps) if programs and args.steps else {}
    lines = [json.dumps({**common, **figures[policy], **timed.get(policy, {})}) for policy in figures]
    print("\n".join(lines), flush=True)
    if args.out:
        with args.out.open("a") as out:
            out.writelines(line + "\n" for line in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
