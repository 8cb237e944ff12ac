"""Tokens per second of the Grain input pipeline alone: read + tokenize + pack + batch + prefetch.

The training documents of the config (`jaxlm.data.sources.document_sources`; the built-in
corpus, this Python's standard library source, unless data.path or data.tfds say otherwise) go
through `jaxlm.data.pipeline.HostBatches`, exactly as `jaxlm train` draws them, with the
config's data.worker_count and data.prefetch. No model runs: after --warmup untimed batches
(worker start-up, first reads), --batches batches are drawn back to back and timed.

tokens_per_s counts every position of every row (train.global_batch_size × data.seq_len per
batch), as the training throughput does; compare it with bench/train_throughput.py's figure.
next_ms_* are the wall times of single `next()` calls, the wait a train step would see.
Prints one JSON line to stdout; logs go to stderr.

    python bench/data_throughput.py configs/tiny.yaml --batches 500
    python bench/data_throughput.py configs/tiny.yaml data.worker_count=2 --batches 500
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

import jaxlm.model  # noqa: F401 (registers the model families configs validate against)
from jaxlm.config import load_config
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizers import load_tokenizer

log = logging.getLogger("jaxlm")


def benchmark(config_path: str, overrides: list[str], batches: int, warmup: int) -> dict[str, Any]:
    """Draw host batches with no model attached; the figures of the JSON line."""
    config = load_config(config_path, overrides)
    train_docs, _ = sources.document_sources(config.data)
    data = pipeline.HostBatches(train_docs, config, load_tokenizer(config.data))
    try:
        started = time.perf_counter()
        for _ in range(warmup):
            next(data)
        log.info("%d warm-up batches took %.2fs", warmup, time.perf_counter() - started)
        next_seconds = []
        cpu_started, started = time.process_time(), time.perf_counter()
        for _ in range(batches):
            before = time.perf_counter()
            next(data)
            next_seconds.append(time.perf_counter() - before)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
    finally:
        data.close()

    tokens_per_batch = config.train.global_batch_size // jax.process_count() * config.data.seq_len
    return {
        "config": config_path,
        "overrides": overrides,
        "documents": len(train_docs),
        "tokenizer": config.data.tokenizer,
        "worker_count": config.data.worker_count,
        "prefetch": config.data.prefetch,
        "batches": batches,
        "tokens_per_batch": tokens_per_batch,
        "tokens_per_s": tokens_per_batch * batches / seconds,
        "next_ms_median": 1e3 * statistics.median(next_seconds),
        "next_ms_max": 1e3 * max(next_seconds),
        # CPU of this process (its prefetch and reader threads too; worker processes not included).
        "process_cpu_ms_per_batch": 1e3 * cpu_seconds / batches,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--batches", type=int, default=500, help="timed batches")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    args = parser.parse_intermixed_args(argv)
    if args.batches < 1 or args.warmup < 0:
        parser.error("--batches must be at least 1 and --warmup at least 0")
    return report(lambda: benchmark(args.config, args.overrides, args.batches, args.warmup))


if __name__ == "__main__":
    sys.exit(main())
