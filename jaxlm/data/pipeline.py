"""The Grain input pipeline: documents → tokens → packed rows → host batches → global arrays.

Each row of the global batch has its own stream: row j of every batch is the next packed row of
stream j, which reads the documents at positions j, j + B, j + 2B, ... of the seeded order of all
documents (B = train.global_batch_size), epoch after epoch, each epoch in a new order. So a batch
draws from B different documents (a long document fills one row of each batch while it lasts,
not whole batches), and the global batches depend on the seed and the data only: each process
reads the streams of its own rows of the batch, whatever the number of processes, and a
checkpoint keeps every stream's position, which any number of processes can restore.

Text documents are packed by concatenating them and cutting at `seq_len`; `segment_ids` number
the documents within a row (attention never crosses them) and `positions` restart at each
document. `loss_mask` says which targets the loss trains on: in pretraining every target of a
document (all but padding, which such rows do not have). Instruction records (prompt/completion,
chats: `jaxlm.data.instructions`) are packed whole, first-fit, into `data.packing_bins` rows at a
time: an example is never split across rows, and the rest of a row is padding (segment 0,
loss_mask 0).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxlm import parallel
from jaxlm.config import Config
from jaxlm.data import mixing
from jaxlm.data.counts import DataCounts
from jaxlm.data.instructions import InstructionExamples
from jaxlm.data.sources import TEXT, DocumentSource, Part, TfdsSource
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import ConfigError, DataError

log = logging.getLogger("jaxlm")

Batch = dict[str, np.ndarray]  # FIELDS: [rows, seq_len] int32 each, and "source": [rows]
FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
# Random access: index → document text (prepared data: token ids), or → an instruction example.
Source = DocumentSource | TfdsSource | InstructionExamples
# A corpus: one source, or weighted parts (data.mixture) whose rows are mixed in their proportions.
Corpus = Source | list[Part]


class _Tokenize(grain.transforms.Map):
    """Document text (or prepared token ids) → next-token pairs, with the end-of-document token
    as both BOS and EOS."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, document: str | np.ndarray) -> dict[str, np.ndarray]:
        ids = document if isinstance(document, np.ndarray) else self.tokenizer.encode(document)
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


def examples(source: Source, config: Config, tokenizer: Tokenizer, name: str = "the data") -> Source:
    """A source as the pipeline reads it: instruction records become their examples, each record
    checked (and the ones with nothing to train on reported) here, once."""
    if isinstance(source, DocumentSource) and source.kind != TEXT:
        return InstructionExamples(source, config, tokenizer, name)
    return source


def corpus_examples(
    corpus: Corpus, config: Config, tokenizer: Tokenizer, *, validation: bool = False
) -> Corpus:
    """`examples` of each part's training (or validation) source."""
    if not isinstance(corpus, list):
        return examples(corpus, config, tokenizer)
    if validation:
        return [
            dataclasses.replace(
                part,
                validation=part.validation
                and examples(part.validation, config, tokenizer, f"{part.name} (validation)"),
            )
            for part in corpus
        ]
    return [
        dataclasses.replace(part, train=examples(part.train, config, tokenizer, part.name)) for part in corpus
    ]


def _whole_example_row(packed: dict[str, np.ndarray]) -> Batch:
    """A row of whole examples, as FirstFitPackIterDataset packed it: padding has segment 0."""
    return {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "positions": packed["tokens_positions"],
        "segment_ids": packed["tokens_segment_ids"],
        "loss_mask": packed["loss_mask"],
    }


def pack_whole(examples: grain.IterDataset, seq_len: int, bins: int) -> grain.IterDataset:
    """Examples (tokens/targets/loss_mask, at most seq_len each) packed first-fit into [seq_len]
    rows, `bins` rows at a time, never split. The state is the parent's at the last packed group
    and the rows of it emitted, so a restored iterator repacks that group the same way."""
    rows = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=bins,
        shuffle_bins=False,
    )
    return rows.map(_whole_example_row)


def packed_rows(
    source: Source,
    config: Config,
    tokenizer: Tokenizer,
    *,
    stream: int = 0,
    streams: int = 1,
    shuffle: bool = True,
) -> grain.IterDataset:
    """An endless stream of packed [seq_len] rows: stream `stream` of `streams`, which takes the
    documents at positions stream, stream + streams, ... of the seeded order of all of them
    (every epoch in a new order; with `shuffle=False`, the source's order)."""
    source = examples(source, config, tokenizer)
    documents = grain.MapDataset.source(source)
    if shuffle:
        documents = documents.shuffle(seed=config.train.seed)
    # Read in the thread that packs: a process packs hundreds of streams, and a batch's read-ahead
    # happens a level up (ThreadPrefetch or Grain's worker processes).
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    seq_len = config.data.seq_len
    if isinstance(source, InstructionExamples):
        stream_examples = documents.repeat(None)[stream::streams].to_iter_dataset(read)
        return pack_whole(stream_examples, seq_len, config.data.packing_bins)
    tokens = documents.repeat(None)[stream::streams].map(_Tokenize(tokenizer))
    rows = tokens.to_iter_dataset(read)
    rows = grain.experimental.ConcatThenSplitIterDataset(
        rows, length_struct={"tokens": seq_len, "targets": seq_len}
    )
    return rows.map(_pretraining_row)


def stream_rows(
    corpus: Corpus,
    config: Config,
    tokenizer: Tokenizer,
    *,
    stream: int,
    streams: int,
    validation: bool = False,
) -> grain.IterDataset:
    """Stream `stream` of `streams` of a corpus: with several parts, each part's stream packed on
    its own and their rows mixed by weight (`mixing.MixedRows`: every stream holds the
    proportions row by row, and, each reading the schedule from its own row, every batch too)."""
    if not isinstance(corpus, list):
        return packed_rows(corpus, config, tokenizer, stream=stream, streams=streams).map(_FromSource(0))
    parts = [(part, part.validation if validation else part.train) for part in corpus]
    rows = {
        part.name: packed_rows(source, config, tokenizer, stream=stream, streams=streams).map(
            _FromSource(index)
        )
        for index, (part, source) in enumerate(parts)
        if source is not None
    }
    if len(rows) == 1:
        return next(iter(rows.values()))
    weights = [part.weight for part, _ in parts if part.name in rows]
    return mixing.MixedRows(list(rows.values()), weights, offset=stream)


class _FromSource(grain.transforms.Map):
    """Tags a row with the index of the corpus part it comes from, for counting."""

    def __init__(self, index: int):
        self.index = index

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**row, "source": np.int32(self.index)}


class RowsOfStreams(grain.IterDataset):
    """Batches of one row from each of several row streams, in order: [streams, seq_len] per field."""

    def __init__(self, streams: list[grain.IterDataset]):
        super().__init__(streams)

    def __iter__(self) -> grain.DatasetIterator:
        return _RowsOfStreamsIterator([iter(stream) for stream in self.parents])


class _RowsOfStreamsIterator(grain.DatasetIterator):
    def __next__(self) -> Batch:
        rows = [next(stream) for stream in self._parents]
        return {field: np.stack([row[field] for row in rows]) for field in (*FIELDS, "source")}

    def get_state(self) -> dict:
        return {"streams": [stream.get_state() for stream in self._parents]}

    def set_state(self, state: dict) -> None:
        for stream, stream_state in zip(self._parents, state["streams"], strict=True):
            stream.set_state(stream_state)


class HostBatches:
    """This process's rows of each global batch: one row from each stream it owns.

    The data position (`position` / `restore_position`) is each stream's, by stream index, so
    any process layout can restore it. With Grain worker processes (`data.worker_count`) each
    worker packs its own slice of the streams' documents, and the position is this process's
    as a whole: it restores only into the same process layout and worker count.
    """

    def __init__(
        self, corpus: Corpus, config: Config, tokenizer: Tokenizer, rows: parallel.ProcessRows | None = None
    ):
        """rows: the block of each batch this process reads (`parallel.process_rows`); None = an
        equal share by process index."""
        self.stream_count = config.train.global_batch_size
        rows = rows or _equal_share(self.stream_count)
        self.stream_indices = list(range(rows.first, rows.first + rows.count))
        self.counted = rows.counted
        self.worker_count = config.data.worker_count
        corpus = corpus_examples(corpus, config, tokenizer)
        self.counts = DataCounts(corpus, tokenizer.eos_id)
        dataset = RowsOfStreams(
            [
                stream_rows(corpus, config, tokenizer, stream=index, streams=self.stream_count)
                for index in self.stream_indices
            ]
        )
        if self.worker_count:
            _use_default_grain_flags()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        elif config.data.prefetch:
            dataset = grain.experimental.ThreadPrefetchIterDataset(
                dataset, prefetch_buffer_size=config.data.prefetch
            )
        self._iterator = iter(dataset)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        if self.counted:  # not again by processes that read the same rows
            self.counts.add(batch)
        return batch

    def position(self) -> dict:
        """Where this process's streams are, and what its rows have seen: a JSON-able dict."""
        state = self._iterator.get_state()
        seen = self.counts.local()
        if self.worker_count:
            return {
                "worker_count": self.worker_count,
                "streams": self.stream_indices,
                "grain": state,
                "seen": seen,
            }
        streams = dict(zip(map(str, self.stream_indices), state["streams"], strict=True))
        return {"worker_count": 0, "streams": streams, "seen": seen}

    def restore_position(self, saved: list[dict]) -> None:
        """Restore from the positions every process of the saving run wrote."""
        self.counts.restore([position.get("seen", {}) for position in saved])
        if any(position["worker_count"] != self.worker_count for position in saved):
            counts = sorted({position["worker_count"] for position in saved})
            raise DataError(
                f"the checkpoint's data position was saved with data.worker_count={counts[0]} "
                f"and this run sets {self.worker_count}: resume with "
                f"data.worker_count={counts[0]} (the data order depends on it)"
            )
        if self.worker_count:
            ours = [position for position in saved if position["streams"] == self.stream_indices]
            if not ours:
                raise DataError(
                    f"the checkpoint's data position was saved by Grain worker processes of another "
                    f"process layout (this process reads rows {self.stream_indices[0]}-{self.stream_indices[-1]}); "
                    "resume with the saving run's number of processes, or save with data.worker_count=0, "
                    "whose position any layout restores"
                )
            self._iterator.set_state(ours[0]["grain"])
            return
        streams = {int(index): state for position in saved for index, state in position["streams"].items()}
        missing = [index for index in self.stream_indices if index not in streams]
        if missing:
            raise DataError(f"the checkpoint's data position has no state for data stream {missing[0]}")
        self._iterator.set_state({"streams": [streams[index] for index in self.stream_indices]})

    def close(self) -> None:
        if hasattr(self._iterator, "close"):
            self._iterator.close()


def _use_default_grain_flags() -> None:
    """Grain's worker processes read absl flags; jaxlm has none of its own, so take the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _equal_share(rows: int) -> parallel.ProcessRows:
    """Each process an equal block of the rows, by process index."""
    if rows % jax.process_count():
        raise ConfigError(
            f"train.global_batch_size={rows} is not divisible by the {jax.process_count()} processes"
        )
    per_process = rows // jax.process_count()
    return parallel.ProcessRows(jax.process_index() * per_process, per_process, counted=True)


def eval_host_batches(
    corpus: Corpus, config: Config, tokenizer: Tokenizer, rows: parallel.ProcessRows | None = None
) -> list[Batch]:
    """The fixed validation batches (this process's rows), read once and reused by every eval:
    drawn from streams like the training batches, so an eval spans many documents.

    Every process packs all streams of the validation set and keeps its rows, so tiny validation
    splits work on any number of processes.
    """
    rows_per_batch = config.train.global_batch_size
    corpus = corpus_examples(corpus, config, tokenizer, validation=True)
    streams = RowsOfStreams(
        [
            stream_rows(corpus, config, tokenizer, stream=i, streams=rows_per_batch, validation=True)
            for i in range(rows_per_batch)
        ]
    )
    rows = rows or _equal_share(rows_per_batch)
    iterator = iter(streams)
    batches = []
    for _ in range(config.train.eval_batches):
        batch = next(iterator)
        batches.append({field: batch[field][rows.first : rows.first + rows.count] for field in FIELDS})
    return batches


def to_global(
    batch: Batch, sharding: NamedSharding, shape: tuple[int, int] | None = None
) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays of `shape` ([rows, length]; None = this
    process's rows × the processes) with the batch sharding (one call for all fields)."""
    fields = {field: batch[field] for field in FIELDS}
    return jax.make_array_from_process_local_data(sharding, fields, shape)


def whole_to_global(
    batch: Batch, sharding: NamedSharding, fields: Sequence[str] = FIELDS
) -> dict[str, jax.Array]:
    """A batch that every process holds whole (evaluation reads all of its data everywhere) as
    global arrays with the batch sharding: each process places the rows of its own devices."""
    return {
        field: jax.make_array_from_callback(batch[field].shape, sharding, batch[field].__getitem__)
        for field in fields
    }


def evaluation_rows(source: Source, config: Config, tokenizer: Tokenizer) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `source` exactly once, in the source's order, packed whole into [seq_len]
    rows: FIELDS, int32 [seq_len] each.

    A text document is one example (cut into consecutive seq_len pieces where longer, as
    pretraining cuts it; loss on every target); an instruction record is one example with its
    loss mask (records with nothing to train on are left out and reported, as in training;
    longer ones follow data.too_long). Rows are filled in order, a new one started when the next
    example does not fit, and padded (segment 0, loss_mask 0).
    """
    source = examples(source, config, tokenizer)
    seq_len = config.data.seq_len
    row = _RowFiller(seq_len)
    for index in range(len(source)):
        for piece in _evaluation_pieces(source[index], tokenizer, seq_len):
            if not row.fits(piece):
                yield row.take()
            row.add(piece)
    if row.examples:
        yield row.take()


def _evaluation_pieces(item: str | np.ndarray | dict, tokenizer: Tokenizer, seq_len: int) -> list[dict]:
    """An example (instruction records come as one), or a document's seq_len-long pieces."""
    if isinstance(item, dict):
        return [item]
    pairs = _Tokenize(tokenizer).map(item)
    pairs["loss_mask"] = np.ones_like(pairs["tokens"])
    return [
        {field: values[start : start + seq_len] for field, values in pairs.items()}
        for start in range(0, len(pairs["tokens"]), seq_len)
    ]


class _RowFiller:
    """One [seq_len] row being filled with whole examples, in order."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._reset()

    def _reset(self) -> None:
        self.row = {field: np.zeros(self.seq_len, np.int32) for field in FIELDS}
        self.used, self.examples = 0, 0

    def fits(self, example: dict) -> bool:
        return self.used + len(example["tokens"]) <= self.seq_len

    def add(self, example: dict) -> None:
        length = len(example["tokens"])
        place = slice(self.used, self.used + length)
        for field in ("tokens", "targets", "loss_mask"):
            self.row[field][place] = example[field]
        self.examples += 1
        self.row["segment_ids"][place] = self.examples
        self.row["positions"][place] = np.arange(length)
        self.used += length

    def take(self) -> dict[str, np.ndarray]:
        row = self.row
        self._reset()
        return row
