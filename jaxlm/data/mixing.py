"""Rows of several corpus parts mixed by weight, each batch holding the weights.

Every row stream of the batch (`pipeline.stream_rows`) mixes its parts with one fixed schedule:
smooth weighted round-robin, which gives part p a share `weight_p` of any run of rows, to within
a row or two. Stream j reads that schedule from row j onward, so the B rows of a batch are B
consecutive entries of it: each batch holds every part in its proportion (a 7:3 mixture in a
16-row batch: 11 or 12 rows and 4 or 5), not whole batches of one part. The schedule's state is
a few numbers, saved with the parts' positions, so a restored stream mixes on exactly.
"""

from __future__ import annotations

import grain
import numpy as np


class WeightedRounds:
    """Smooth weighted round-robin: each turn every part gains its weight in credit, the part with
    the most credit is chosen and pays back 1 (ties: the first part)."""

    def __init__(self, weights: list[float]):
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.credits = np.zeros(len(weights), np.float64)

    def next(self) -> int:
        self.credits += self.weights
        chosen = int(np.argmax(self.credits))
        self.credits[chosen] -= 1.0
        return chosen


class MixedRows(grain.IterDataset):
    """The rows of `parts` (endless row streams) interleaved by `weights`, read from row `offset`
    of the shared schedule (the stream's index in the batch)."""

    def __init__(self, parts: list[grain.IterDataset], weights: list[float], offset: int):
        super().__init__(parts)
        self.weights, self.offset = weights, offset

    def __iter__(self) -> grain.DatasetIterator:
        return _MixedRowsIterator([iter(part) for part in self.parents], self.weights, self.offset)


class _MixedRowsIterator(grain.DatasetIterator):
    def __init__(self, parts: list[grain.DatasetIterator], weights: list[float], offset: int):
        super().__init__(parts)
        self._rounds = WeightedRounds(weights)
        for _ in range(offset):  # skip the schedule, not the parts: no row is read or lost
            self._rounds.next()

    def __next__(self):
        return next(self._parents[self._rounds.next()])

    def get_state(self) -> dict:
        return {
            "credits": [float(credit) for credit in self._rounds.credits],
            "parts": [part.get_state() for part in self._parents],
        }

    def set_state(self, state: dict) -> None:
        self._rounds.credits = np.asarray(state["credits"], np.float64)
        for part, part_state in zip(self._parents, state["parts"], strict=True):
            part.set_state(part_state)
