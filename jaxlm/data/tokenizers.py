"""Tokenizers: a built-in byte-level one, and any Hugging Face `tokenizer.json` (a path or gs:// URL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jaxlm import storage
from jaxlm.config import DataConfig
from jaxlm.errors import DataError
from jaxlm.hf import files

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    eos_token: str  # the end-of-document token as text, as chat templates write it

    def encode(self, text: str) -> np.ndarray: ...

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids of a rendered chat (special tokens written as text become their ids, nothing
        added) and each token's [start, end) characters in `text`: ([tokens], [tokens, 2])."""
        ...

    def encode_prompt(self, text: str) -> np.ndarray:
        """A prompt's ids, starting as the model's training documents start."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids, special tokens left out; U+FFFD where a character is incomplete."""
        ...

    def special_token_text(self, token_id: int) -> str | None:
        """The text that encodes to the special token `token_id` ("<|begin_of_text|>"), or None
        where no text does."""
        ...

    def token_bytes(self) -> np.ndarray:
        """[vocab_size] UTF-8 bytes each token stands for (0 for special tokens): for bits per byte."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; 256 marks document boundaries."""

    vocab_size = 257
    eos_id = 256
    eos_token = "<|endoftext|>"  # only chat templates write it; plain text never becomes id 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids, starts, ends = [], [], []
        for piece_start, piece in _split_keeping(text, self.eos_token):
            if piece == self.eos_token:
                ids.append(np.array([self.eos_id], np.int32))
                starts.append(np.array([piece_start]))
                ends.append(np.array([piece_start + len(piece)]))
                continue
            code_points = np.frombuffer(piece.encode("utf-32-le"), np.uint32)
            utf8_lengths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
            chars = piece_start + np.repeat(np.arange(len(piece)), utf8_lengths)  # [bytes]
            ids.append(self.encode(piece))
            starts.append(chars)
            ends.append(chars + 1)
        offsets = np.stack([np.concatenate(starts), np.concatenate(ends)], axis=1).astype(np.int64)
        return np.concatenate(ids).astype(np.int32), offsets

    def encode_prompt(self, text: str) -> np.ndarray:
        # jaxlm's training documents begin with the end-of-document token (data/pipeline.py).
        return np.concatenate([np.array([self.eos_id], np.int32), self.encode(text)])

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def special_token_text(self, token_id: int) -> None:
        return None  # `encode` makes bytes of any text, never the end-of-document id

    def token_bytes(self) -> np.ndarray:
        return np.array([1] * 256 + [0], np.int32)


class HuggingFaceTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library (no network).

    Prompts start as the model's training documents did: with the end-of-document token for a
    model jaxlm trained (data/pipeline.py), or, with `hf_prompts`, with the special tokens the
    tokenizer adds itself, as transformers encodes them (Llama 3 adds its BOS, Qwen2 nothing)."""

    def __init__(self, path: str, eos_token: str | None, *, hf_prompts: bool = False):
        self.hf_prompts = hf_prompts
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tokenizer = HFTokenizer.from_str(storage.read_bytes(path).decode("utf-8"))
        except Exception as error:
            raise DataError(
                f"data.tokenizer={path} could not be loaded as a tokenizer.json ({error})"
            ) from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token or self._end_of_document_token(path)
        self.eos_id = self._tokenizer.token_to_id(self.eos_token)
        if self.eos_id is None:
            raise DataError(
                f"data.eos_token={eos_token} is not a token of data.tokenizer={path}; set data.eos_token "
                "to the end-of-document token it has"
            )

    def _end_of_document_token(self, path: str) -> str:
        """The end-of-document token that the model directory around `path` names
        (files.special_tokens); where it names none, or `path` is a tokenizer.json alone, the
        first of EOS_CANDIDATES that the tokenizer has."""
        directory = storage.path(path).parent
        in_directory = files.names_special_tokens(directory)
        if in_directory and (named := files.special_tokens(directory, self._tokenizer).eos_token):
            return named
        found = [name for name in EOS_CANDIDATES if self._tokenizer.token_to_id(name) is not None]
        if found:
            return found[0]
        if in_directory:
            raise DataError(
                f"{directory} names no end-of-sequence token (eos_token in {files.TOKENIZER_CONFIG}, "
                f"eos_token_id in {files.CONFIG} or {files.GENERATION_CONFIG}) and its tokenizer has none "
                f"of {', '.join(EOS_CANDIDATES)}; set eos_token in {directory / files.TOKENIZER_CONFIG}, "
                "or data.eos_token"
            )
        raise DataError(
            f"data.tokenizer={path} has no end-of-document token among {', '.join(EOS_CANDIDATES)}; "
            "set data.eos_token to the one it uses"
        )

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        # As transformers' apply_chat_template tokenizes a rendered chat: no special tokens added.
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(encoding.ids, np.int32), np.asarray(encoding.offsets, np.int64).reshape(-1, 2)

    def encode_prompt(self, text: str) -> np.ndarray:
        if self.hf_prompts:
            return np.asarray(self._tokenizer.encode(text, add_special_tokens=True).ids, np.int32)
        return np.concatenate([np.array([self.eos_id], np.int32), self.encode(text)])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def special_token_text(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id) or None

    def token_bytes(self) -> np.ndarray:
        # A byte-level BPE token may hold part of a multi-byte character; decoding it alone gives
        # U+FFFD (3 bytes), so this count is close, not exact, for non-ASCII text.
        lengths = np.zeros(self.vocab_size, np.int32)
        special = {
            token.content for token in self._tokenizer.get_added_tokens_decoder().values() if token.special
        }
        for token_id in range(self.vocab_size):
            if self._tokenizer.id_to_token(token_id) in special:
                continue
            lengths[token_id] = len(
                self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
            )
        return lengths


def _split_keeping(text: str, separator: str) -> list[tuple[int, str]]:
    """`text` cut before and after each `separator`, with each piece's character offset."""
    pieces, start = [], 0
    while (found := text.find(separator, start)) >= 0:
        pieces += [(start, text[start:found]), (found, separator)]
        start = found + len(separator)
    return [*pieces, (start, text[start:])]


def load_tokenizer(config: DataConfig, *, hf_prompts: bool = False) -> Tokenizer:
    """data.tokenizer; `hf_prompts`: a Hugging Face model's, whose prompts start as transformers
    encodes them (see HuggingFaceTokenizer)."""
    if config.tokenizer == "byte":
        return ByteTokenizer()
    if storage.is_bucket(config.tokenizer):
        storage.check_bucket(config.tokenizer, "data.tokenizer")
    if not storage.path(config.tokenizer).is_file():
        raise DataError(
            f"data.tokenizer={config.tokenizer} is neither 'byte' nor an existing tokenizer.json file"
        )
    return HuggingFaceTokenizer(config.tokenizer, config.eos_token, hf_prompts=hf_prompts)
