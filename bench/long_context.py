"""Memory of a whole train step at long rows, per attention path: the TPU compiler's figures.

For each --lengths L and each --attention path (xla, splash), the config's train step is
compiled for one TPU topology with `jaxlm.planning.plan.plan` (libtpu's compile-only devices, on this
machine's CPU: no TPU needed) with `data.seq_len=L`, and its memory analysis is reported: peak
per chip (what must fit in HBM), temporaries, and the refusal when the compiler ran out of HBM.
The batch and mesh come from the config and the overrides: give rows and context splits that
divide (`train.global_batch_size=8 mesh.context=...`). One JSON line per run of the script:

    python bench/long_context.py configs/llama_1b.yaml train.global_batch_size=8 train.micro_batches=1 \
        model.remat=full --topology v5p:2x2x2 --lengths 4096 8192 32768

(overrides before the options: --lengths takes every number after it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from report import report  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path

from jaxlm.config import load_config
from jaxlm.planning import plan

log = logging.getLogger("jaxlm")
GiB = 2**30


def measure(
    config_path: str, overrides: list[str], topology: str, length: int, attention: str
) -> dict[str, Any]:
    """One compiled step's memory per chip, or the compiler's refusal (with what it needed)."""
    config = load_config(config_path, [*overrides, f"data.seq_len={length}", f"attention.kernel={attention}"])
    started = time.perf_counter()
    figures = plan.plan(config, topology)
    return {
        "fits": figures.fits,
        "peak_bytes": figures.peak_bytes,
        "temp_bytes": figures.temp_bytes,
        "peak_gib": round(figures.peak_bytes / GiB, 3),
        "hbm_gib": round(figures.hbm_bytes / GiB, 2),
        "mesh": figures.mesh,
        "refusal": figures.refusal,
        "compile_s": round(time.perf_counter() - started, 1),
    }


def benchmark(config_path: str, overrides: list[str], topology: str, lengths: list[int], paths: list[str]):
    runs = {}
    for length in lengths:
        for attention in paths:
            log.info("compiling %s at %d tokens with attention.kernel=%s", topology, length, attention)
            runs[f"{attention}/{length}"] = measure(config_path, overrides, topology, length, attention)
    return {"config": config_path, "overrides": overrides, "topology": topology, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--attention", nargs="+", default=["xla", "splash"], choices=["xla", "splash"])
    args, overrides = parser.parse_known_args()
    return report(lambda: benchmark(args.config, overrides, args.topology, args.lengths, args.attention))


if __name__ == "__main__":
    sys.exit(main())
