"""What the data has given so far: tokens trained on, documents (or instruction examples)
started, and padding, per part of the corpus, for the metrics records."""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.data.instructions import InstructionExamples
from jaxlm.data.sources import DocumentSource, Part, TfdsSource

log = logging.getLogger("jaxlm")

Batch = dict[str, np.ndarray]  # as pipeline.Batch: FIELDS [rows, seq_len] each, and "source": [rows]


class DataCounts:
    """Tokens trained on, documents (or instruction examples) started and padding, per part of
    the corpus, counted as batches pass.

    Each process counts its own rows; `seen` sums them over processes. A checkpoint keeps each
    process's counts, and a resumed run's process 0 takes their sum, so totals carry over onto
    any number of processes.
    """

    COLUMNS = 4  # tokens trained on, documents started, padding tokens, row tokens

    def __init__(self, corpus: list[Part] | DocumentSource | TfdsSource | InstructionExamples, eos_id: int):
        parts = corpus if isinstance(corpus, list) else [Part("the data", 1.0, corpus, None)]
        self.names = [part.name for part in parts]
        self.documents = [len(part.train) for part in parts]
        self.whole_examples = [isinstance(part.train, InstructionExamples) for part in parts]
        self.eos_id = eos_id
        self._counts = np.zeros((len(parts), self.COLUMNS), np.int64)  # [part, column]
        self._repeating_warned = [False] * len(parts)
        self._batches, self._untrained_batches = 0, 0  # this process's, since it started
        self._padding_logged = False

    def add(self, batch: Batch) -> None:
        self._batches += 1
        trained = 0
        for index, whole in enumerate(self.whole_examples):
            rows = batch["source"] == index
            part_trained = int(batch["loss_mask"][rows].sum())
            self._counts[index, 0] += part_trained
            trained += part_trained
            if whole:  # an example starts where its positions do
                segment_ids = batch["segment_ids"][rows]
                starts = (batch["positions"][rows] == 0) & (segment_ids > 0)
                self._counts[index, 1] += int(np.count_nonzero(starts))
                self._counts[index, 2] += int(np.count_nonzero(segment_ids == 0))
            else:  # each document starts with the end-of-document token, once
                self._counts[index, 1] += int(np.count_nonzero(batch["tokens"][rows] == self.eos_id))
            self._counts[index, 3] += int(np.count_nonzero(rows)) * batch["tokens"].shape[1]
        if not trained:
            self._untrained_batches += 1
            if self._untrained_batches == 1:
                log.warning(
                    "batch %d of this process has no target to train on (its loss_mask is all 0): "
                    "its rows count for nothing; batches like it are counted as untrained_batches",
                    self._batches,
                )

    def local(self) -> dict[str, list[int]]:
        return {
            name: [int(value) for value in counts]
            for name, counts in zip(self.names, self._counts, strict=True)
        }

    def restore(self, saved: list[dict[str, list[int]]]) -> None:
        self._counts[:] = 0
        if jax.process_index() != 0:
            return
        for counts in saved:
            for index, name in enumerate(self.names):
                values = counts.get(name, [])  # checkpoints before padding was counted hold two
                self._counts[index, : len(values)] += np.asarray(values, np.int64)
        self._repeating_warned = [
            bool(documents >= total)
            for documents, total in zip(self._counts[:, 1], self.documents, strict=True)
        ]

    def seen(self) -> dict[str, float]:
        """Tokens and documents seen over all processes, in total and per part, and each part's
        epoch (its documents seen / its documents); warns when a part first starts repeating. With
        several processes it is a collective: every process calls it at the same step."""
        counts = self._counts
        if jax.process_count() > 1:  # gathered as bytes: int64 counts would become int32
            gathered = multihost_utils.process_allgather(np.frombuffer(counts.tobytes(), np.uint8))
            counts = (
                np.frombuffer(np.asarray(gathered, np.uint8).tobytes(), np.int64)
                .reshape(-1, *counts.shape)
                .sum(0)
            )
        record = {"tokens_seen": float(counts[:, 0].sum()), "documents_seen": float(counts[:, 1].sum())}
        if any(self.whole_examples):
            record["padding_fraction"] = self._padding_fraction(counts)
        if self._untrained_batches:
            record["untrained_batches"] = float(self._untrained_batches)
        for index, (name, (tokens, documents, *_)) in enumerate(zip(self.names, counts, strict=True)):
            epoch = documents / self.documents[index]
            # Once: fine-tuning runs many epochs on purpose; the metrics' `epoch` follows them all.
            if epoch >= 1 and not self._repeating_warned[index]:
                self._repeating_warned[index] = True
                if jax.process_index() == 0:
                    log.warning(
                        "%s starts repeating: %d documents seen of its %d (epoch %d begins); "
                        "later epochs show in the metrics' epoch, without a warning",
                        name, documents, self.documents[index], int(epoch) + 1,
                    )  # fmt: skip
            suffix = f"/{name}" if len(self.names) > 1 else ""
            if suffix:
                record[f"tokens_seen{suffix}"], record[f"documents_seen{suffix}"] = (
                    float(tokens),
                    float(documents),
                )
            record[f"epoch{suffix}"] = epoch
        return record

    def _padding_fraction(self, counts: np.ndarray) -> float:
        """Padding tokens ÷ row tokens so far, over the parts that pack whole examples; said in
        a log line the first time."""
        padding, row_tokens = counts[self.whole_examples][:, 2:4].sum(0)
        fraction = float(padding / max(row_tokens, 1))
        if not self._padding_logged and row_tokens and jax.process_index() == 0:
            self._padding_logged = True
            log.info(
                "packing whole instruction examples: %.1f%% of the tokens of the rows so far are padding "
                "(logged as padding_fraction; more data.packing_bins packs tighter)",
                100 * fraction,
            )
        return fraction
