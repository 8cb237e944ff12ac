"""XLA attention vs splash attention: forward + backward time here, and compiled memory by length.

Time: one forward + backward pass of each path on packed rows (--documents per row) on this
machine's first device, median of --iters after a warm-up. Off TPU the splash kernel runs in
Pallas interpret mode: its line says so, and its time is not a speed figure.

Memory: the compiler's memory analysis of one attention forward + backward per path at each of
--memory-lengths, on this machine's first device, or with --topology on one chip of a TPU
topology (compiled ahead of time, as `jaxlm plan` does; libtpu needed). Off TPU splash compiles
only in interpret mode, whose memory is not the kernel's: use --topology for its figures.

Prints one JSON line per (measure, path[, length]).

    python bench/attention.py --length 2048 --memory-lengths 4096 8192 32768 --topology v5p:2x2x1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.model.layers import attention_mask, xla_attention
from jaxlm.model.splash import block_sizes, splash_attention


def packed_segment_ids(batch: int, length: int, documents: int) -> np.ndarray:
    """[batch, length] int32: each row cut into `documents` runs at random points."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False))
        rows.append(np.repeat(np.arange(1, documents + 1), np.diff([0, *cuts, length])))
    return np.stack(rows).astype(np.int32)


def paths(interpret: bool) -> dict[str, Callable]:
    """Each path as attend(q, k, v, segment_ids) → out."""
    return {
        "xla": lambda q, k, v, segment_ids: xla_attention(q, k, v, attention_mask(segment_ids)),
        "splash": lambda q, k, v, segment_ids: splash_attention(q, k, v, segment_ids, interpret=interpret),
    }


def fwd_bwd(attend: Callable) -> Callable:
    """(q, k, v, segment_ids, grad) → (out, (dq, dk, dv))."""

    def run(q, k, v, segment_ids, grad):
        out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, segment_ids), q, k, v)
        return out, pullback(grad)

    return run


def shapes(args, length: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    b, h, kv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.bfloat16
    return (
        jax.ShapeDtypeStruct((b, length, h, d), dtype),
        jax.ShapeDtypeStruct((b, length, kv, d), dtype),
        jax.ShapeDtypeStruct((b, length, kv, d), dtype),
        jax.ShapeDtypeStruct((b, length), jnp.int32),
        jax.ShapeDtypeStruct((b, length, h, d), dtype),
    )


def time_paths(args, device: jax.Device) -> None:
    interpret = device.platform != "tpu"
    arrays = [
        jax.random.normal(jax.random.key(i), s.shape, s.dtype) if s.dtype != jnp.int32 else None
        for i, s in enumerate(shapes(args, args.length))
    ]
    arrays[3] = jnp.asarray(packed_segment_ids(args.batch, args.length, args.documents))
    arrays = jax.device_put(arrays, device)
    for name, attend in paths(interpret).items():
        step = jax.jit(fwd_bwd(attend))
        jax.block_until_ready(step(*arrays))
        seconds = []
        for _ in range(args.iters):
            started = time.perf_counter()
            jax.block_until_ready(step(*arrays))
            seconds.append(time.perf_counter() - started)
        figures = {
            "measure": "fwd_bwd_time",
            "path": name,
            "device": device.device_kind,
            "shape": [args.batch, args.length, args.heads, args.kv_heads, args.head_dim],
            "documents": args.documents,
            "fwd_bwd_ms": statistics.median(seconds) * 1e3,
        }
        if name == "splash" and interpret:
            figures["note"] = f"Pallas interpret mode on {device.platform}: not a speed figure"
        print(json.dumps(figures), flush=True)


def memory_of_paths(args, device: jax.Device, target: str) -> None:
    interpret = device.platform != "tpu"
    sharding = NamedSharding(Mesh(np.array([device]), ("chip",)), PartitionSpec())
    for length in args.memory_lengths:
        for name, attend in paths(interpret).items():
            if name == "splash" and interpret:
                continue
            figures: dict = {"measure": "compiled_memory", "path": name, "target": target, "length": length}
            figures["shape"] = [args.batch, length, args.heads, args.kv_heads, args.head_dim]
            if name == "splash":
                blocks = block_sizes(length, length, None, None, args.head_dim)
                figures["blocks"] = [blocks.block_q, blocks.block_kv]
            try:
                started = time.perf_counter()
                step = jax.jit(fwd_bwd(attend), in_shardings=sharding, out_shardings=sharding)
                memory = step.lower(*shapes(args, length)).compile().memory_analysis()
                figures["compile_s"] = round(time.perf_counter() - started, 2)
                figures["temp_bytes"] = memory.temp_size_in_bytes
                figures["argument_bytes"] = memory.argument_size_in_bytes
                figures["output_bytes"] = memory.output_size_in_bytes
                figures["peak_bytes"] = getattr(memory, "peak_memory_in_bytes", None)
            except Exception as error:  # a program this target refuses (too large): report, go on
                figures["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            print(json.dumps(figures), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048, help="tokens per row for the timing")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--documents", type=int, default=4, help="documents packed in each row")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--memory-lengths", type=int, nargs="*", default=[4096, 8192, 32768])
    parser.add_argument("--topology", help="compile the memory figures for one chip of this TPU topology")
    parser.add_argument("--skip-time", action="store_true", help="only the memory figures")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    if not args.skip_time:
        time_paths(args, device)
    if args.topology:
        from jaxlm.planning.plan import topology_devices

        chip = topology_devices(args.topology)[0]
        memory_of_paths(args, chip, f"{chip.device_kind} ({args.topology})")
    else:
        memory_of_paths(args, device, device.device_kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
