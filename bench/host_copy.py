"""How fast device arrays reach host memory, as a checkpoint save moves them, first time and after.

On GPUs Orbax copies the train state into `pinned_host` memory before writing it. This copies
--gib GiB of float32 arrays (1 GiB each) from the first device there --repeats times, then once
with jax.device_get into ordinary (pageable) NumPy memory, and prints one JSON line of seconds
and GiB/s. The first pinned copy pays for pinning the host memory; later ones reuse it.

    python bench/host_copy.py --gib 14
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=14, help="GiB to copy, in 1 GiB arrays")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    arrays = [jnp.full((1024, 1024, 256), i, jnp.float32) for i in range(args.gib)]
    jax.block_until_ready(arrays)
    figures: dict = {"device": device.device_kind, "gib": args.gib, "pinned_host_s": []}
    if any(memory.kind == "pinned_host" for memory in device.addressable_memories()):
        pinned = SingleDeviceSharding(device, memory_kind="pinned_host")
        for _ in range(args.repeats):
            started = time.perf_counter()
            jax.block_until_ready([jax.device_put(array, pinned) for array in arrays])
            figures["pinned_host_s"].append(time.perf_counter() - started)
        figures["pinned_host_gib_per_s"] = [args.gib / s for s in figures["pinned_host_s"]]
    started = time.perf_counter()
    jax.device_get(arrays)
    figures["device_get_s"] = time.perf_counter() - started
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
