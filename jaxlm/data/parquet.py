"""Parquet files as a document source, as Hugging Face `datasets` writes them: one document per
row, its text in one string column (data.text_field, default `text`).

A row is read by decoding its row group; the last few decoded groups are kept, so reading rows
in file order (as `jaxlm prepare` does) decodes each group once. Training straight from Parquet
reads rows in a shuffled order, one group per document at worst: prepare large corpora first.
"""

from __future__ import annotations

import bisect
import functools
from typing import Any

from jaxlm import storage
from jaxlm.errors import DataError


def import_pyarrow(path: str) -> Any:
    try:
        import pyarrow.parquet
    except ModuleNotFoundError as error:
        if error.name != "pyarrow":
            raise
        raise DataError(
            f"{path} is a Parquet file, which needs pyarrow, and it is not installed; "
            'pip install -e ".[parquet]" (or pip install "jaxlm[parquet]")'
        ) from None
    return pyarrow.parquet


def _source(path: str) -> Any:
    """What pyarrow reads: the path of a local file, an open gcsfs file for a gs:// URL (so that
    buckets are read through the same layer as every other file)."""
    return storage.path(path).open("rb") if storage.is_bucket(path) else path


def nonempty_rows(path: str, text_field: str) -> list[int]:
    """The rows of a Parquet file whose text column holds a non-empty string."""
    parquet = import_pyarrow(path)
    try:
        file = parquet.ParquetFile(_source(path))
    except Exception as error:
        raise DataError(f"{path} is not a readable Parquet file ({error}); fix or remove it") from None
    if text_field not in file.schema_arrow.names:
        columns = ", ".join(file.schema_arrow.names)
        raise DataError(
            f"{path} has no column {text_field!r} (it has {columns}); set data.text_field to the column "
            "that holds the text"
        )
    kind = file.schema_arrow.field(text_field).type
    if str(kind) not in ("string", "large_string"):
        raise DataError(
            f"{path} column {text_field!r} holds {kind}, not text; set data.text_field to a text column"
        )
    rows, first = [], 0
    for group in range(file.num_row_groups):
        texts = file.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        rows.extend(first + i for i, text in enumerate(texts) if text)
        first += len(texts)
    return rows


def read_row(path: str, row: int, text_field: str) -> str:
    group, first = _group_of(path, row)
    return _row_group(path, group, text_field)[row - first]


@functools.lru_cache(maxsize=64)
def _group_starts(path: str) -> tuple[int, ...]:
    metadata = import_pyarrow(path).ParquetFile(_source(path)).metadata
    starts, first = [], 0
    for group in range(metadata.num_row_groups):
        starts.append(first)
        first += metadata.row_group(group).num_rows
    return tuple(starts)


def _group_of(path: str, row: int) -> tuple[int, int]:
    starts = _group_starts(path)
    group = bisect.bisect_right(starts, row) - 1
    return group, starts[group]


@functools.lru_cache(maxsize=4)
def _row_group(path: str, group: int, text_field: str) -> list[str]:
    return (
        import_pyarrow(path)
        .ParquetFile(_source(path))
        .read_row_group(group, columns=[text_field])
        .column(0)
        .to_pylist()
    )
