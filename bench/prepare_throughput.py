"""Tokens per second of `jaxlm prepare`, and of the training input from prepared shards against
from raw text.

`jaxlm.data.prepare.prepare` tokenizes the config's documents (the built-in corpus unless
data.path says otherwise) into a fresh temporary directory with --workers processes; its
tokens/s counts every token written over the wall time from the first document to the last
write. Then bench/data_throughput.py's measurement draws --batches batches through
`jaxlm.data.pipeline.HostBatches` twice, from the text and from the prepared shards (the same
documents in the same order), with the config's data.worker_count and data.prefetch.
Prints one JSON line to stdout; logs go to stderr.

    python bench/prepare_throughput.py configs/tiny.yaml --batches 500
    python bench/prepare_throughput.py configs/tiny.yaml data.tokenizer=bpe8k.json model.vocab_size=8192 --batches 500
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from data_throughput import benchmark as input_throughput  # bench/ is on sys.path when run
from report import report

import jaxlm.model  # noqa: F401 (registers the model families configs validate against)
from jaxlm.config import load_config
from jaxlm.data.prepare import prepare


def benchmark(
    config_path: str, overrides: list[str], batches: int, warmup: int, workers: int
) -> dict[str, Any]:
    config = load_config(config_path, overrides)
    with tempfile.TemporaryDirectory(prefix="jaxlm-prepared-") as directory:
        manifest = prepare(config.data, directory, workers=workers)
        raw = input_throughput(config_path, overrides, batches, warmup)
        prepared = input_throughput(config_path, [*overrides, f"data.path={directory}"], batches, warmup)
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    return {
        "config": config_path,
        "overrides": overrides,
        "tokenizer": config.data.tokenizer,
        "workers": workers,
        "documents": sum(split["documents"] for split in manifest["splits"].values()),
        "tokens": tokens,
        "prepare_s": manifest["seconds"],
        "prepare_tokens_per_s": tokens / manifest["seconds"],
        "input_tokens_per_s_text": raw["tokens_per_s"],
        "input_tokens_per_s_prepared": prepared["tokens_per_s"],
        "input_cpu_ms_per_batch_text": raw["process_cpu_ms_per_batch"],
        "input_cpu_ms_per_batch_prepared": prepared["process_cpu_ms_per_batch"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--batches", type=int, default=500, help="timed batches of each input")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    args = parser.parse_intermixed_args(argv)
    return report(lambda: benchmark(args.config, args.overrides, args.batches, args.warmup, args.workers))


if __name__ == "__main__":
    sys.exit(main())
