"""Where documents come from: .txt / .jsonl / .parquet files, a prepared TFDS dataset, data
`jaxlm prepare` wrote, or this Python's own standard library.

A source is random access (`len`, index → text), which is what Grain shards and shuffles. A file
document is addressed by a `DocumentRef` (file, and byte offset of the line for .jsonl, or row
for .parquet), so the index is small and documents are read lazily, in any order, from any
process.

A .jsonl record is one of three kinds, told by its fields: a `messages` list (a chat), a
`prompt` and a `completion`, or `data.text_field` (a text document, for pretraining). Each
line is checked when the file is listed; a file holds one kind, and a source one kind.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grain
import numpy as np

from jaxlm import storage
from jaxlm.config import DataConfig
from jaxlm.data import parquet
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.errors import ConfigError, DataError, cause

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT, PROMPT_COMPLETION, CHAT = "text", "prompt_completion", "chat"  # record kinds
KIND_NAMES = {
    TEXT: "text documents",
    PROMPT_COMPLETION: "prompt/completion records",
    CHAT: "chat (messages) records",
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class DocumentRef:
    path: str
    offset: int = -1  # byte offset of the line in a .jsonl file, row of a .parquet; -1 = a whole .txt
    name: str = ""  # stable across machines: relative path (and line), used for the split
    length: int = -1  # bytes of the .jsonl line
    kind: str = TEXT  # what the record holds: TEXT, PROMPT_COMPLETION or CHAT


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[DocumentRef]:
    """Every .py file of the running interpreter's standard library (not site-packages)."""
    root = stdlib_root()
    refs = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(relative.parts) or path.stat().st_size == 0:
            continue
        refs.append(DocumentRef(str(path), -1, relative.as_posix()))
    if not refs:
        raise DataError(
            f"found no .py files under the standard library at {root}; set data.path to your own text"
        )
    return refs


def find_files(spec: str) -> tuple[dict[str, int], str]:
    """Files (and their sizes) named by a directory, a glob or a single file, local or gs://, and
    the root to name them from."""
    if storage.is_bucket(spec):
        storage.check_bucket(spec, "data.path")
    path = storage.path(spec)
    if path.is_dir():
        files, root = storage.files_under(path), str(path)
    elif path.is_file():
        files, root = {str(path): path.stat().length}, str(path.parent)
    elif glob.has_magic(spec):
        files = storage.glob_files(spec)
        root = _common_parent(list(files)) if files else ""
    else:
        raise DataError(
            f"data.path={spec} does not exist; point it at a directory, glob or file of .txt/.jsonl/.parquet "
            "documents, or leave it null for the built-in corpus"
        )
    files = {name: size for name, size in sorted(files.items()) if name.endswith(TEXT_SUFFIXES)}
    if not files:
        raise DataError(
            f"data.path={spec} holds no .txt, .jsonl or .parquet files; add some or point it elsewhere"
        )
    return files, root


def _common_parent(files: list[str]) -> str:
    scheme = storage.BUCKET_SCHEME if storage.is_bucket(files[0]) else ""
    bare = [name.removeprefix(scheme) for name in files]
    return scheme + os.path.commonpath([os.path.dirname(name) for name in bare])


def _relative(path: str, root: str) -> str:
    """The name of a file below root, the same for a corpus on a disk and its copy in a bucket."""
    if storage.is_bucket(path):
        return path.removeprefix(root.rstrip("/") + "/")
    return os.path.relpath(path, root) if root else path


def file_documents(spec: str, text_field: str) -> list[DocumentRef]:
    """One document per .txt file, per non-blank .jsonl line and per non-empty .parquet row."""
    files, root = find_files(spec)
    refs = []
    for path, size in files.items():
        relative = _relative(path, root)
        if path.endswith(".txt"):
            if size:
                refs.append(DocumentRef(path, -1, relative))
            continue
        if path.endswith(".parquet"):
            rows = parquet.nonempty_rows(path, text_field)
            refs.extend(DocumentRef(path, row, f"{relative}:{row + 1}") for row in rows)
            continue
        refs.extend(_jsonl_records(path, relative, text_field))
    if not refs:
        raise DataError(f"data.path={spec} has no non-empty documents; the corpus is empty")
    _check_one_kind(refs, spec)
    return refs


def _jsonl_records(path: str, relative: str, text_field: str) -> list[DocumentRef]:
    """A reference to each non-blank line of a .jsonl file, each checked, all of one kind."""
    refs, offset, first = [], 0, None
    with storage.path(path).open("rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                where = f"{path}:{line_number}"
                kind = _check_record(line, text_field, where)
                first = first or (kind, where)
                if kind != first[0]:
                    raise DataError(
                        f"{where} is one of the {KIND_NAMES[kind]} but {first[1]} is one of the "
                        f"{KIND_NAMES[first[0]]}; keep one kind of record per file (split the file in two)"
                    )
                refs.append(DocumentRef(path, offset, f"{relative}:{line_number}", len(line), kind))
            offset += len(line)
    return refs


def _check_one_kind(refs: list[DocumentRef], spec: str) -> None:
    """Text and instruction records are packed apart (see pipeline), so a source holds one kind."""
    first = {}
    for ref in refs:
        first.setdefault(ref.kind, ref)
    if len(first) > 1:
        (kind_a, ref_a), (kind_b, ref_b) = list(first.items())[:2]
        raise DataError(
            f"data.path={spec} holds {KIND_NAMES[kind_a]} ({ref_a.name}) and {KIND_NAMES[kind_b]} "
            f"({ref_b.name}); give each kind its own source in data.mixture"
        )


def _check_record(line: bytes, text_field: str, where: str) -> str:
    """The kind of a .jsonl record; one line naming the problem where it is not a good one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where} is not valid JSON ({error.msg}); fix or remove that line") from None
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text; fix or remove that line") from None
    if isinstance(record, dict) and "messages" in record:
        _check_messages(record["messages"], where)
        if not isinstance(record.get("tools", []), list):
            raise DataError(f"{where}: 'tools' must be a list of tool schemas; fix that line")
        return CHAT
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        if not (isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)):
            raise DataError(
                f"{where} needs a string 'prompt' and a string 'completion'; fix that line (a chat goes in 'messages')"
            )
        return PROMPT_COMPLETION
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(
            f"{where} has no string field {text_field!r}; set data.text_field to the field that holds the text, "
            "or give instruction records 'prompt' + 'completion' or 'messages'"
        )
    return TEXT


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise DataError(
            f'{where}: \'messages\' must be a list of {{"role": ..., "content": ...}} objects; fix that line'
        )
    for number, message in enumerate(messages, start=1):
        if message.get("role") not in ROLES:
            raise DataError(
                f"{where}: message {number} has role {message.get('role')!r}; use one of {', '.join(ROLES)}"
            )
        calls_tools = message["role"] == "assistant" and isinstance(message.get("tool_calls"), list)
        if not isinstance(message.get("content"), str) and not (
            calls_tools and message.get("content") is None
        ):
            raise DataError(
                f"{where}: message {number} has no string 'content' (only an assistant's tool_calls may stand "
                "without one); fix that line"
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(
            f"{where} has no assistant message, so nothing to train on; add one or remove that line"
        )


def read_document(ref: DocumentRef, text_field: str) -> str | dict:
    """A document's text, or an instruction record (a dict) for the other kinds."""
    if ref.offset < 0:
        return storage.read_bytes(ref.path).decode("utf-8", errors="replace")
    if ref.path.endswith(".parquet"):
        return parquet.read_row(ref.path, ref.offset, text_field)
    record = json.loads(storage.read_bytes(ref.path, ref.offset, ref.offset + ref.length))
    return record[text_field] if ref.kind == TEXT else record


def list_documents(path: str | None, text_field: str) -> list[DocumentRef]:
    return stdlib_documents() if path is None else file_documents(path, text_field)


def split_documents(
    refs: list[DocumentRef], validation_fraction: float
) -> tuple[list[DocumentRef], list[DocumentRef]]:
    """Train / validation split by a stable hash of each document's name (same on every machine)."""
    if validation_fraction == 0:
        return refs, []
    scores = [_unit_hash(ref.name) for ref in refs]
    train = [ref for ref, score in zip(refs, scores, strict=True) if score >= validation_fraction]
    validation = [ref for ref, score in zip(refs, scores, strict=True) if score < validation_fraction]
    if not validation and len(refs) > 1:
        # Too few documents for the fraction to pick any: hold out the lowest-scoring one.
        held_out = min(range(len(refs)), key=scores.__getitem__)
        validation = [refs[held_out]]
        train = [ref for i, ref in enumerate(refs) if i != held_out]
    if not train:
        raise DataError(
            f"data.validation_fraction={validation_fraction} leaves no training documents; lower it or add documents"
        )
    return train, validation


def _unit_hash(name: str) -> float:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class DocumentSource:
    """Grain random-access source: index → document text (or instruction record)."""

    def __init__(self, refs: list[DocumentRef], text_field: str):
        self.refs = refs
        self.text_field = text_field
        self.kind = refs[0].kind if refs else TEXT  # one kind per source (file_documents)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> str | dict:
        return read_document(self.refs[index], self.text_field)


def import_tfds(name: str) -> ModuleType:
    """tensorflow_datasets, which only data.tfds needs and the `tfds` extra installs."""
    try:
        import tensorflow_datasets
    except ModuleNotFoundError as error:
        if error.name != "tensorflow_datasets":
            raise  # installed but broken: the traceback names what is missing
        raise DataError(
            f"data.tfds={name} needs TensorFlow Datasets, which is not installed; "
            'pip install -e ".[tfds]" (or pip install "jaxlm[tfds]")'
        ) from None
    return tensorflow_datasets


class TfdsSource:
    """One split of a TensorFlow Datasets dataset prepared as array_record: index → text."""

    def __init__(self, config: DataConfig, split: str):
        tfds = import_tfds(config.tfds)
        where = config.tfds_data_dir or "TFDS's default data dir"
        try:
            self._records = tfds.data_source(
                config.tfds, split=split, data_dir=config.tfds_data_dir, download=False
            )
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(
                f"data.tfds={config.tfds} split {split!r} cannot be read from {where}: {reason}. Prepare it "
                "there first (tfds build --file_format=array_record); jaxlm never downloads data"
            ) from None
        self.text_field = config.text_field
        self.kind = TEXT
        if len(self._records) == 0:
            raise DataError(f"data.tfds={config.tfds} split {split!r} is empty")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        text = self._records[index][self.text_field]
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


@dataclass(frozen=True)
class Part:
    """One source of the corpus: its documents for training and validation, and its weight."""

    name: str  # data.path (or the TFDS name, or the built-in corpus) it comes from
    weight: float  # share of the training rows, normalised over the parts
    train: DocumentSource | TfdsSource
    validation: DocumentSource | TfdsSource | None


def corpus(config: DataConfig) -> list[Part]:
    """The parts of the configured corpus: data.mixture's sources, or the one source."""
    if not config.mixture:
        train, validation = document_sources(config)
        name = config.tfds or config.path or "the standard library"
        return [Part(name, 1.0, train, validation)]
    total = sum(source.weight for source in config.mixture)
    parts = []
    for source in config.mixture:
        train, validation = document_sources(config.model_copy(update={"path": source.path, "mixture": []}))
        parts.append(Part(source.path, source.weight / total, train, validation))
    return parts


def document_sources(
    config: DataConfig,
) -> tuple[DocumentSource | TfdsSource, DocumentSource | TfdsSource | None]:
    """The training and validation sources of a config (validation None when there is none)."""
    if is_prepared(config.path):
        check_tokenizer(config.path, config)
        return prepared_sources(config.path)
    if config.tfds:
        split = config.tfds_validation_split
        return TfdsSource(config, config.tfds_train_split), TfdsSource(config, split) if split else None
    refs = list_documents(config.path, config.text_field)
    train, validation = split_documents(refs, config.validation_fraction)
    return DocumentSource(train, config.text_field), DocumentSource(
        validation, config.text_field
    ) if validation else None


# ---------------------------------------------------------------------------------------------
# Prepared data: the directories `jaxlm prepare` writes (jaxlm.data.prepare), read here.

MANIFEST = "manifest.json"
FORMAT = "jaxlm-prepared/1"
SPLITS = ("train", "validation")


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
        self.kind = TEXT

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self._records[index], np.int32)


def prepared_sources(path: str) -> tuple[PreparedSource, PreparedSource | None]:
    splits = read_manifest(path)["splits"]
    validation = PreparedSource(path, "validation") if splits["validation"]["documents"] else None
    return PreparedSource(path, "train"), validation
