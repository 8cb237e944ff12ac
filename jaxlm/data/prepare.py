"""`jaxlm prepare`: tokenize a corpus once, in parallel over this machine's cores, into ArrayRecord
shards that training reads without tokenizing.

A prepared directory holds `train-<i>-of-<n>.array_record` and `validation-<i>-of-<n>.array_record`
files, one record per document (its token ids, little-endian int32, without the
end-of-document token the pipeline adds), and `manifest.json`: the tokenizer's identity, the
source, and the documents and tokens of each split. `data.path` pointing at such a directory
trains from it; a run whose tokenizer differs from the manifest's is refused.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxlm import storage
from jaxlm.config import DataConfig
from jaxlm.data import sources
from jaxlm.data.sources import FORMAT, MANIFEST, SPLITS, is_prepared, tokenizer_identity
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.errors import ConfigError, DataError, cause

log = logging.getLogger("jaxlm")

CHUNK = 256  # documents per task handed to a worker process

_worker: dict[str, Any] = {}


def _start_worker(config: DataConfig) -> None:
    """In each worker process: the tokenizer and the documents, listed as the parent lists them."""
    _worker["tokenizer"] = load_tokenizer(config)
    _worker["splits"] = dict(zip(SPLITS, sources.document_sources(config), strict=True))


def _tokenize(split: str, start: int, stop: int) -> list[bytes]:
    source, tokenizer = _worker["splits"][split], _worker["tokenizer"]
    return [tokenizer.encode(source[index]).astype("<i4").tobytes() for index in range(start, stop)]


def prepare(
    config: DataConfig, out: str, shards: int | None = None, workers: int | None = None
) -> dict[str, Any]:
    """Tokenize the configured corpus into `out`; returns the manifest."""
    if config.mixture:
        raise ConfigError(
            "jaxlm prepare takes one source (data.path or data.tfds); prepare each part of data.mixture on its own"
        )
    if is_prepared(config.path):
        raise ConfigError(f"data.path={config.path} is prepared data already; point it at the documents")
    if storage.is_bucket(out):
        storage.check_bucket(out, "--out")
    directory = storage.path(out)
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(
            f"--out {out} is not empty; choose a new directory (prepared data is never overwritten)"
        )
    tokenizer = load_tokenizer(config)
    listed = dict(zip(SPLITS, sources.document_sources(config), strict=True))
    if listed["train"].kind != sources.TEXT:
        raise DataError(
            f"data.path={config.path} holds {sources.KIND_NAMES[listed['train'].kind]}: jaxlm prepare tokenizes "
            "text documents only; train on the .jsonl directly (its records are checked and packed at start-up)"
        )
    # ArrayRecord's writer writes local files only: for a bucket each shard is written in a local
    # directory, then uploaded and removed.
    bucket = storage.is_bucket(out)
    staging = Path(tempfile.mkdtemp(prefix="jaxlm-prepare-")) if bucket else Path(directory)
    staging.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    shards = shards or workers
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "tokenizer": tokenizer_identity(config),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "source": config.tfds or config.path or "the standard library",
        "validation_fraction": config.validation_fraction,
        "splits": {},
    }
    total = sum(len(source) for source in listed.values() if source is not None)
    progress = _Progress(total)
    started = time.perf_counter()
    try:
        manifest["splits"] = _write_splits(
            config, listed, staging, directory if bucket else None, workers, shards, progress
        )
    finally:
        if bucket:
            shutil.rmtree(staging, ignore_errors=True)
    progress.close()
    seconds = time.perf_counter() - started
    manifest["seconds"] = seconds
    try:  # last: its presence means complete
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except Exception as error:
        raise DataError(
            f"cannot write {directory / MANIFEST} ({cause(error)}); check --out and its access"
        ) from None
    train, validation = manifest["splits"]["train"], manifest["splits"]["validation"]
    log.info(
        "prepared %s train / %s validation documents, %s / %s tokens, in %.1fs (%s tokens/s) into %s",
        f"{train['documents']:,}", f"{validation['documents']:,}", f"{train['tokens']:,}",
        f"{validation['tokens']:,}", seconds, f"{(train['tokens'] + validation['tokens']) / seconds:,.0f}", out,
    )  # fmt: skip
    return manifest


def _write_splits(
    config: DataConfig,
    listed: dict[str, Any],
    staging: Path,
    bucket: Any,
    workers: int,
    shards: int,
    progress: _Progress,
) -> dict[str, Any]:
    """Tokenize each split in `workers` processes into at most `shards` ArrayRecord files in
    `staging` (uploaded to the gs:// directory `bucket`, if given, as each is closed); returns
    each split's documents, tokens and files."""
    from array_record.python.array_record_module import ArrayRecordWriter

    splits = {}
    # Spawned, not forked: a fork of a process that has started JAX's threads can deadlock.
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=spawn, initializer=_start_worker, initargs=(config,)
    ) as pool:
        for split, source in listed.items():
            documents = len(source) if source is not None else 0
            split_shards = max(1, min(shards, documents))
            files, tokens = [], 0
            for shard in range(split_shards):
                start, stop = shard * documents // split_shards, (shard + 1) * documents // split_shards
                name = f"{split}-{shard:05d}-of-{split_shards:05d}.array_record"
                writer = ArrayRecordWriter(str(staging / name), "group_size:1")
                chunks = [(split, s, min(s + CHUNK, stop)) for s in range(start, stop, CHUNK)]
                for records in pool.map(_tokenize, *zip(*chunks, strict=True)) if chunks else ():
                    for record in records:
                        writer.write(record)
                        tokens += len(record) // 4
                    progress.update(len(records), tokens)
                writer.close()
                if bucket is not None:
                    storage.upload(staging / name, str(bucket / name), "prepare again into a new --out")
                    (staging / name).unlink()
                files.append(name)
            splits[split] = {"documents": documents, "tokens": tokens, "files": files}
    return splits


class _Progress:
    """A progress bar of documents tokenized on a terminal; a log line every 10% otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self._next_log = total, 0, 0.1
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("tokenizing"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[tokens]} tokens"),
                TimeRemainingColumn(),
            )  # fmt: skip
            self._task = self._bar.add_task("prepare", total=total, tokens="0")
            self._bar.start()

    def update(self, documents: int, tokens: int) -> None:
        self.done += documents
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, tokens=f"{tokens:,}")
        elif self.total and self.done / self.total >= self._next_log:
            log.info("tokenized %d of %d documents", self.done, self.total)
            self._next_log += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
