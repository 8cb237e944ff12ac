"""The Grain input pipeline: documents → tokens → packed rows → host batches → global arrays.

The training stream is split into `data.shards` independent shards of the document list; each
process reads only the shards it owns. A host batch is the rows of its shards side by side, so a
given `data.shards` yields the same global batch whatever the number of processes.

Rows are packed by concatenating documents and cutting at `seq_len`; `segment_ids` number the
documents within a row (attention never crosses them) and `positions` restart at each document.
`loss_mask` says which targets the loss trains on: in pretraining every target of a document
(all but padding, which packed rows do not have).
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxlm.config import Config
from jaxlm.data.sources import DocumentSource, TfdsSource
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]  # FIELDS: [rows, seq_len] int32 each
FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
Source = DocumentSource | TfdsSource  # random access: index → document text


class _Tokenize(grain.transforms.Map):
    """Document text → next-token pairs, with the end-of-document token as both BOS and EOS."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        eos = np.array([self.tokenizer.eos_id], np.int32)
        return {"tokens": np.concatenate([eos, ids]), "targets": np.concatenate([ids, eos])}


def most_documents_per_row(segment_ids: np.ndarray) -> int:
    """The largest number of documents (runs of equal segment ids) in any row of [rows, length]."""
    return int(np.max(np.count_nonzero(np.diff(segment_ids, axis=1), axis=1))) + 1


def _pretraining_row(packed: dict[str, np.ndarray]) -> Batch:
    """A packed row with its loss mask: every target that belongs to a document."""
    segment_ids = packed["tokens_segment_ids"]
    return {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "positions": packed["tokens_positions"],
        "segment_ids": segment_ids,
        "loss_mask": (segment_ids > 0).astype(np.int32),
    }


def packed_rows(
    source: Source,
    config: Config,
    tokenizer: Tokenizer,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    shuffle: bool = True,
) -> grain.IterDataset:
    """An endless stream of packed [seq_len] rows from one shard of the documents."""
    documents = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(documents) == 0:
        raise DataError(
            f"data shard {shard_index} of {shard_count} has no documents ({len(source)} in all); "
            "use fewer data.shards or add documents"
        )
    if shuffle:
        documents = documents.shuffle(seed=config.train.seed + shard_index)
    tokens = documents.repeat(None).map(_Tokenize(tokenizer))
    rows = tokens.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
    seq_len = config.data.seq_len
    rows = grain.experimental.ConcatThenSplitIterDataset(
        rows, length_struct={"tokens": seq_len, "targets": seq_len}
    )
    return rows.map(_pretraining_row)


def shard_count(config: Config) -> int:
    shards = config.data.shards or jax.process_count()
    if shards % jax.process_count():
        raise ConfigError(
            f"data.shards={shards} is not a multiple of the {jax.process_count()} processes; "
            "use a multiple, or 0 for one shard per process"
        )
    if config.train.global_batch_size % shards:
        raise ConfigError(
            f"train.global_batch_size={config.train.global_batch_size} is not divisible by data.shards={shards}"
        )
    return shards


class HostBatches:
    """This process's rows of each global batch, drawn from the data shards it owns.

    Checkpointable per shard (`shard_states` / `restore_shard_states`), so a run may resume on
    another number of processes as long as `data.shards` stays the same. Each state records
    data.worker_count: Grain's worker processes each pack their own slice of the documents, so
    the position means nothing, or the wrong thing, to another number of workers.
    """

    def __init__(self, source: Source, config: Config, tokenizer: Tokenizer):
        self.shard_count = shard_count(config)
        self.worker_count = config.data.worker_count
        per_process = self.shard_count // jax.process_count()
        first = jax.process_index() * per_process
        self.shard_indices = list(range(first, first + per_process))
        rows_per_shard = config.train.global_batch_size // self.shard_count
        self._iterators = []
        for shard_index in self.shard_indices:
            stream = packed_rows(
                source, config, tokenizer, shard_index=shard_index, shard_count=self.shard_count
            )
            stream = stream.batch(rows_per_shard, drop_remainder=True)
            if config.data.worker_count:
                _use_default_grain_flags()
                stream = stream.mp_prefetch(
                    grain.MultiprocessingOptions(num_workers=config.data.worker_count)
                )
            elif config.data.prefetch:
                stream = grain.experimental.ThreadPrefetchIterDataset(
                    stream, prefetch_buffer_size=config.data.prefetch
                )
            self._iterators.append(iter(stream))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        parts = [next(iterator) for iterator in self._iterators]
        if len(parts) == 1:
            return {field: parts[0][field] for field in FIELDS}
        return {field: np.concatenate([part[field] for part in parts]) for field in FIELDS}

    def shard_states(self) -> dict[int, dict]:
        """The position of each shard this process reads, by shard index: its Grain iterator
        state and the worker count that state belongs to."""
        return {
            index: {"worker_count": self.worker_count, "grain": iterator.get_state()}
            for index, iterator in zip(self.shard_indices, self._iterators, strict=True)
        }

    def restore_shard_states(self, states: dict[int, dict]) -> None:
        for index, iterator in zip(self.shard_indices, self._iterators, strict=True):
            state = states[index]
            if "grain" not in state:  # saved before the worker count was recorded
                iterator.set_state(state)
                continue
            if state["worker_count"] != self.worker_count:
                raise DataError(
                    f"the checkpoint's data position was saved with data.worker_count={state['worker_count']} "
                    f"and this run sets {self.worker_count}: resume with "
                    f"data.worker_count={state['worker_count']} (the data order depends on it)"
                )
            iterator.set_state(state["grain"])

    def close(self) -> None:
        for iterator in self._iterators:
            if hasattr(iterator, "close"):
                iterator.close()


def _use_default_grain_flags() -> None:
    """Grain's worker processes read absl flags; jaxlm has none of its own, so take the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_host_batches(source: Source, config: Config, tokenizer: Tokenizer) -> list[Batch]:
    """The fixed validation batches (this process's rows), read once and reused by every eval.

    Every process packs the same validation stream and keeps its rows, so tiny validation splits
    work on any number of processes.
    """
    rows = packed_rows(source, config, tokenizer, shuffle=False).batch(
        config.train.global_batch_size, drop_remainder=True
    )
    per_process = config.train.global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    iterator = iter(rows)
    batches = []
    for _ in range(config.train.eval_batches):
        batch = next(iterator)
        batches.append({field: batch[field][start : start + per_process] for field in FIELDS})
    iterator.close()
    return batches


def to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays with the batch sharding (one call for
    all fields)."""
    return jax.make_array_from_process_local_data(sharding, {field: batch[field] for field in FIELDS})
