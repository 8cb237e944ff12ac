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
import glob
import hashlib
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

import grain
import numpy as np

from jaxlm import storage
from jaxlm.config import DataConfig
from jaxlm.data import sources
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.errors import ConfigError, DataError, cause

log = logging.getLogger("jaxlm")

MANIFEST = "manifest.json"
FORMAT = "jaxlm-prepared/1"
SPLITS = ("train", "validation")
CHUNK = 256  # documents per task handed to a worker process


def tokenizer_identity(config: DataConfig) -> dict[str, Any]:
    """What makes two tokenizers the same for prepared data: the file's content, not its path, and
    the end-of-document token it resolves to (data.eos_token, else the one its directory names,
    else its guess), not how the config named it."""
    if config.tokenizer == "byte":
        return {"tokenizer": "byte"}
    digest = hashlib.sha256(storage.read_bytes(config.tokenizer)).hexdigest()
    eos_token = load_tokenizer(config).eos_token
    return {"tokenizer": storage.path(config.tokenizer).name, "sha256": digest, "eos_token": eos_token}


def is_prepared(path: str | None) -> bool:
    if path is None or glob.has_magic(path):
        return False
    if storage.is_bucket(path):
        storage.check_bucket(path, "data.path")
    return (storage.path(path) / MANIFEST).is_file()


def read_manifest(path: str) -> dict[str, Any]:
    manifest_path = storage.path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except Exception as error:
        raise DataError(f"{manifest_path} cannot be read ({cause(error)}); prepare the data again") from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{manifest_path} is not a jaxlm prepared-data manifest ({FORMAT}); prepare the data again"
        )
    return manifest


def check_tokenizer(path: str, config: DataConfig) -> None:
    """Refuse prepared data whose tokens another tokenizer made."""
    prepared, ours = read_manifest(path)["tokenizer"], tokenizer_identity(config)
    if prepared.get("sha256") and prepared.get("eos_token") is None:
        # Written before manifests held the resolved token: its data ends documents with the token
        # the tokenizer resolves by itself.
        prepared = {
            **prepared,
            "eos_token": tokenizer_identity(config.model_copy(update={"eos_token": None}))["eos_token"],
        }
    if prepared != ours:
        raise ConfigError(
            f"data.path={path} was prepared with tokenizer {_describe(prepared)} and this run's is "
            f"{_describe(ours)}; set data.tokenizer to the one it was prepared with, or prepare it again"
        )


def _describe(identity: dict[str, Any]) -> str:
    if identity["tokenizer"] == "byte":
        return "byte"
    eos = f", eos_token {identity['eos_token']}" if identity.get("eos_token") else ""
    return f"{identity['tokenizer']} (sha256 {identity['sha256'][:12]}{eos})"


class PreparedSource:
    """One split of a prepared directory: index → the document's token ids (Grain random access)."""

    def __init__(self, path: str, split: str):
        directory = storage.path(path)
        files = read_manifest(path)["splits"][split]["files"]
        self._records = grain.sources.ArrayRecordDataSource([str(directory / name) for name in files])
        self.kind = sources.TEXT

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self._records[index], np.int32)


def prepared_sources(path: str) -> tuple[PreparedSource, PreparedSource | None]:
    splits = read_manifest(path)["splits"]
    validation = PreparedSource(path, "validation") if splits["validation"]["documents"] else None
    return PreparedSource(path, "train"), validation


# ---------------------------------------------------------------------------------------------
# Writing.

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
