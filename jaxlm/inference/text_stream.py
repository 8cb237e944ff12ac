"""One generated row as text, as its tokens come: decoded without splitting a character, cut
before the first stop string, and handed out (for streaming) only once no stop string can start
in it any more."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from jaxlm.data.tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding gives for a character whose bytes have not all come yet


class RowText:
    """The tokens of one row and their text.

    A token's text can depend on the tokens around it (a multi-byte character split over byte
    tokens, a SentencePiece word's leading space), so each new piece is the decoding of the last
    decoded chunk and the tokens after it, less the decoding of that chunk alone; while it ends
    in an incomplete character, the tokens wait for the next one."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Collection[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.stop = tuple(string for string in stop if string)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.finish_reason: str | None = None  # "eos", "stop" or "length" once finished
        self._hold = max((len(string) for string in self.stop), default=1) - 1
        self._prefix = 0  # token_ids[_prefix:_read] is the last decoded chunk
        self._read = 0  # tokens before this are in `text`
        self._taken = 0  # characters of `text` handed out by take_final_text

    def add(self, token: int, logprob: float, *, last: bool = False) -> None:
        """The row's next token; `last`: no more will come."""
        if token in self.eos_ids:
            self._decode(complete=True)
            self._finish("eos")
            return
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self._decode(complete=last)
        if last:
            self._finish("length")

    def take_final_text(self) -> str:
        """The text that no later token or stop string can change, not taken before."""
        end = len(self.text) if self.finish_reason else max(self._taken, len(self.text) - self._hold)
        piece, self._taken = self.text[self._taken : end], end
        return piece

    def _decode(self, complete: bool) -> None:
        if self.finish_reason or self._read == len(self.token_ids):
            return
        chunk = self.tokenizer.decode(self.token_ids[self._prefix : self._read])
        with_new = self.tokenizer.decode(self.token_ids[self._prefix :])
        if with_new.endswith(REPLACEMENT) and not complete:
            return
        self._prefix, self._read = self._read, len(self.token_ids)
        self._append(with_new[len(chunk) :])

    def _append(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        # A stop string not found before ends in the new piece: it starts at most _hold earlier.
        found = [i for string in self.stop if (i := self.text.find(string, max(0, start - self._hold))) >= 0]
        if found:
            self.text = self.text[: min(found)]
            self._finish("stop")

    def _finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
