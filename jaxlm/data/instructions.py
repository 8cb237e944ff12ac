"""Instruction records → training examples: token ids, next-token targets, and a loss mask that
trains on the answer only (a prompt's completion, or a chat's assistant turns).

A prompt/completion example is [EOS] prompt completion [EOS], the prompt and the completion
tokenized apart (as a prompt is at generation time), trained on the completion and the final
EOS, so the model learns to stop. A chat is rendered with its chat template (`jaxlm.data.chat`)
and tokenized once, as transformers' `apply_chat_template` does; its targets inside assistant
turns are trained on.

`InstructionExamples` checks every record of a source once, at start-up: records that train on
no token, that the template gives no assistant turns for, or that are longer than
`data.seq_len` are counted and named in one log line each, and a source with no example left is
an error before anything compiles.
"""

from __future__ import annotations

import logging
from collections import Counter

import jax
import jinja2
import numpy as np

from jaxlm.config import Config
from jaxlm.data.chat import ChatTemplate, load_chat_template
from jaxlm.data.sources import CHAT, KIND_NAMES, PROMPT_COMPLETION, DocumentSource
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import DataError

log = logging.getLogger("jaxlm")

Example = dict[str, np.ndarray]  # tokens, targets, loss_mask: [length] int32 each

# Why a record yields no example.
EMPTY, NO_SPANS, DROPPED = "empty", "no_spans", "dropped"


def prompt_completion_example(record: dict, tokenizer: Tokenizer) -> Example:
    prompt, completion = tokenizer.encode(record["prompt"]), tokenizer.encode(record["completion"])
    eos = np.array([tokenizer.eos_id], np.int32)
    ids = np.concatenate([eos, prompt, completion, eos])
    trained = np.zeros(len(ids), np.int32)
    trained[1 + len(prompt) :] = 1  # the completion's tokens and the closing EOS
    return _next_token_pairs(ids, trained)


def chat_example(record: dict, tokenizer: Tokenizer, template: ChatTemplate) -> Example | None:
    """A chat's example; None where the template gives no way to find its assistant turns."""
    text, spans = template.assistant_spans(record["messages"], tools=record.get("tools"))
    if spans is None:
        return None
    ids, offsets = tokenizer.encode_with_offsets(text)  # [tokens], [tokens, 2]
    starts, ends = np.asarray(spans).T  # [spans] each
    # A token is the assistant's where its characters overlap a turn's (as transformers masks).
    overlaps = (offsets[:, :1] < ends[None]) & (offsets[:, 1:] > starts[None])  # [tokens, spans]
    return _next_token_pairs(ids, overlaps.any(axis=1).astype(np.int32))


def _next_token_pairs(ids: np.ndarray, trained: np.ndarray) -> Example:
    """Inputs and next-token targets of `ids`; a target is trained on where its token is."""
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": trained[1:]}


def _has_answer(record: dict, kind: str) -> bool:
    if kind == PROMPT_COMPLETION:
        return bool(record["completion"].strip())
    return any(
        m["role"] == "assistant" and ((m.get("content") or "").strip() or m.get("tool_calls"))
        for m in record["messages"]
    )


class InstructionExamples:
    """Grain random-access source of the examples of a source's instruction records: index →
    example (truncated to data.seq_len). Records that yield none are left out, and reported."""

    def __init__(self, records: DocumentSource, config: Config, tokenizer: Tokenizer, name: str):
        self.records, self.kind, self.tokenizer = records, records.kind, tokenizer
        self.template = load_chat_template(config.data, tokenizer) if self.kind == CHAT else None
        self.seq_len, self.too_long = config.data.seq_len, config.data.too_long
        self.name = name
        self.kept = self._check_all()  # [examples] indices of the records kept

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index: int) -> Example:
        example = self.example(self.records[int(self.kept[index])])
        assert example is not None  # _check_all kept only records that have one
        return {field: values[: self.seq_len] for field, values in example.items()}

    def example(self, record: dict) -> Example | None:
        """The record's whole example (None: the template gives no assistant turns for it);
        raises DataError where the template refuses the record."""
        if self.kind == PROMPT_COMPLETION:
            return prompt_completion_example(record, self.tokenizer)
        try:
            return chat_example(record, self.tokenizer, self.template)
        except jinja2.TemplateError as error:
            raise DataError(
                f"the chat template {self.template.name} refuses this chat ({error}); fix the record or set data.chat_template"
            ) from None

    def _check_all(self) -> np.ndarray:
        """Every record's example, once: the indices of those to train on."""
        kept, left_out, first = [], Counter(), {}
        too_long, first_too_long = 0, None
        for index, ref in enumerate(self.records.refs):
            try:
                reason, length = self._verdict(self.records[index])
            except DataError as error:
                raise DataError(f"{ref.name}: {error}") from None
            if length > self.seq_len:
                too_long += 1
                first_too_long = first_too_long or (ref.name, length)
            if reason is None:
                kept.append(index)
            else:
                left_out[reason] += 1
                first.setdefault(reason, ref.name)
        self._report(len(kept), left_out, first, too_long, first_too_long)
        return np.asarray(kept, np.int64)

    def _verdict(self, record: dict) -> tuple[str | None, int]:
        """Why the record is left out (None: it is kept), and the length of its whole example."""
        if not _has_answer(record, self.kind):
            return EMPTY, 0
        example = self.example(record)
        if example is None:
            return NO_SPANS, 0
        length = len(example["tokens"])
        if length <= self.seq_len:
            return None, length
        if self.too_long == "drop":
            return DROPPED, length
        return (None if example["loss_mask"][: self.seq_len].any() else EMPTY), length

    def _report(self, kept: int, left_out: Counter, first: dict, too_long: int, first_too_long) -> None:
        total = len(self.records)
        what = f"{KIND_NAMES[self.kind]} of {self.name}"
        if not kept:
            reason = max(left_out, key=left_out.__getitem__)
            raise DataError(
                f"none of the {total} {what} is left to train on: {self._why(reason)}; the first: "
                f"{first[reason]}; {self._fix(reason)}"
            )
        if jax.process_index() != 0:
            return
        for reason in (EMPTY, NO_SPANS):
            if left_out[reason]:
                log.warning(
                    "%d of the %d %s are left out: %s; the first: %s. To train on them: %s",
                    left_out[reason], total, what, self._why(reason), first[reason], self._fix(reason),
                )  # fmt: skip
        if too_long:
            name, length = first_too_long
            action = "left out" if self.too_long == "drop" else f"cut to their first {self.seq_len} tokens"
            log.warning(
                "%d of the %d %s are longer than data.seq_len=%d tokens and %s (data.too_long=%s); the first: %s (%d tokens)",
                too_long, total, what, self.seq_len, action, self.too_long, name, length,
            )  # fmt: skip
        log.info("%s: %d of the %d records are examples to train on", what, kept, total)

    def _why(self, reason: str) -> str:
        if reason == EMPTY:
            return "they train on no token (an empty completion, no assistant content, or nothing left after truncation)"
        if reason == DROPPED:
            return f"they are longer than data.seq_len={self.seq_len} tokens and data.too_long=drop"
        return (
            f"the chat template {self.template.name} marks no assistant turns with {{% generation %}} blocks, "
            "and a turn rendered with the chat before it does not begin the whole chat"
        )

    def _fix(self, reason: str) -> str:
        if reason == EMPTY:
            return "give them answers (or raise data.seq_len)"
        if reason == DROPPED:
            return "raise data.seq_len, or set data.too_long=truncate"
        return (
            "wrap the template's assistant turns in {% generation %}...{% endgeneration %}, "
            "or set data.chat_template to a template that has them"
        )
