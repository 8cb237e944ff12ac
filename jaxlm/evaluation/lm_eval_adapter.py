"""lm-eval-harness tasks on a jaxlm model, in process: `JaxlmLM` implements lm-eval's model
interface (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) on the model's sharded
parameters, and `run_tasks` evaluates named tasks with it.

Text is split into tokens as lm-eval's Hugging Face backend (HFLM) splits it for the same model,
since a different split is the usual cause of scores that disagree: lm-eval's own `TemplateLM`
encodes each context and continuation (the whole text, then the context, the continuation being
the rest), and `tok_encode` adds the special tokens the tokenizer adds itself (a Hugging Face
model's: Llama 3 its BOS, Qwen2 none), as HFLM does. A model jaxlm trained starts its documents
with the end-of-document token, so its texts start with that token instead.

Requests are sorted by length and scored `batch_size` rows at a time, each batch right-padded to
the next of a few bucket lengths (powers of two up to `max_length`), so the forward compiles once
per bucket, not once per request. This module imports lm-eval: only the `eval` extra installs
it, and jaxlm imports this module only when tasks are asked for (`jaxlm.evaluation.evaluate.lm_eval_adapter`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.tasks import TaskManager

from jaxlm import parallel
from jaxlm.data import pipeline
from jaxlm.errors import UserError
from jaxlm.evaluation.progress import progress_bar
from jaxlm.inference import generation
from jaxlm.inference.loading import Loaded
from jaxlm.training import step

SHORTEST_BUCKET = 16
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's, for tasks that do not say


class JaxlmLM(TemplateLM):
    """A `jaxlm.load`ed model as an lm-eval model, on its mesh."""

    def __init__(
        self,
        loaded: Loaded,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        show_progress: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"--batch-size={batch_size} must be at least 1")
        if max_length is not None and max_length < 2:
            raise UserError(f"--max-length={max_length} must be at least 2 tokens (a context and a target)")
        self.loaded = loaded
        self.max_length = max_length or generation.context_length(loaded)
        self.batch_size = parallel.rows_split_evenly(batch_size, loaded.setup.mesh, loaded.setup.rules)
        self.show_progress = show_progress
        self._score = _scorer(loaded)
        self.batch_shapes: set[tuple[int, int]] = set()  # each one compiled the forward once
        # A text that starts with the prefix token's text gets no second one (HFLM's rule).
        self._prefix_text = loaded.tokenizer.special_token_text(self.prefix_token_id)

    @property
    def eot_token_id(self) -> int:
        return self.loaded.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: the BOS, else EOS."""
        return self.loaded.bos_id if self.loaded.bos_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.config.data.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The ids of `string`, with the tokenizer's own special tokens unless told otherwise or
        the text already starts with the prefix token's text (as HFLM.tok_encode)."""
        if add_special_tokens is None:
            add_special_tokens = not (self._prefix_text and string.startswith(self._prefix_text))
        tokenizer = self.loaded.tokenizer
        ids = tokenizer.encode_prompt(string) if add_special_tokens else tokenizer.encode(string)
        return [int(i) for i in ids]

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(_, context ids, continuation ids) → (log-likelihood of the continuation, whether it is
        the greedy one), the context cut from the left to fit max_length as HFLM cuts it."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        return self._score_rows(rows, "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over windows of max_length tokens, each window predicting
        the tokens the previous ones did not (lm-eval's rolling windows, context 1)."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            pairs = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_eval_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations with jaxlm.inference.generation, cut before
        the request's first `until` string, at most `max_gen_toks` tokens; requests with the same
        generation settings decoded together, longest prompts first."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        answers: list[str] = [""] * len(requests)
        with progress_bar(self.show_progress and not disable_tqdm) as progress:
            task = progress.add_task("generate_until", total=len(requests))
            for indices in groups.values():
                texts = self._generate([requests[i].args[0] for i in indices], requests[indices[0]].args[1])
                for index, text in zip(indices, texts, strict=True):
                    answers[index] = text
                    progress.advance(task)
        return answers

    def _generate(self, contexts: list[str], generation_kwargs: dict) -> list[str]:
        """The continuation of each context under one request's generation settings, in order."""
        kwargs = normalize_gen_kwargs(generation_kwargs, DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if max_gen_toks >= self.max_length:
            raise UserError(
                f"a task asks for {max_gen_toks} new tokens, which leaves no room for its prompt in "
                f"max_length={self.max_length}; raise --max-length"
            )
        # Cut from the left to leave room for the new tokens, as HFLM cuts them.
        prompts = [self.tok_encode(context)[-(self.max_length - max_gen_toks) :] for context in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        completions = generation.iter_completions(
            self.loaded,
            [prompts[i] for i in order],
            max_new_tokens=max_gen_toks,
            greedy=not kwargs.get("do_sample", False),
            temperature=float(kwargs.get("temperature") or 1.0),
            stop=until,
            batch_size=self.batch_size,
        )
        texts = [""] * len(prompts)
        for index, completion in zip(order, completions, strict=True):
            texts[index] = completion.text
        return texts

    def _score_rows(self, rows, what: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """rows of (inputs, targets, scored: the last this many targets) → per row the sum of the
        scored targets' log-probabilities and whether each is the most likely token; longest rows
        first, `batch_size` at a time, each batch fetched while the next one runs."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        chunks = [order[first : first + self.batch_size] for first in range(0, len(order), self.batch_size)]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        pending = None
        with progress_bar(self.show_progress and not disable_tqdm) as progress:
            task = progress.add_task(what, total=len(rows))
            for chosen in [*chunks, None]:
                following = None
                if chosen is not None:
                    batch = _padded_batch([rows[i] for i in chosen], self.batch_size, self.max_length)
                    self.batch_shapes.add(batch["tokens"].shape)
                    following = chosen, batch, self._score(self.loaded.params, batch)
                if pending is not None:
                    self._collect(*pending, results)
                    progress.advance(task, len(pending[0]))
                pending = following
        return results

    @staticmethod
    def _collect(chosen: list[int], batch: dict[str, np.ndarray], scored, results: list) -> None:
        """Each row's sum over its scored targets, and whether all of them are greedy."""
        logprobs, greedy = jax.device_get(scored)  # [rows, length] each
        for row, index in enumerate(chosen):
            mask = batch["score_mask"][row].astype(bool)
            results[index] = (
                float(np.sum(logprobs[row][mask], dtype=np.float64)),
                bool(greedy[row][mask].all()),
            )


def bucket_length(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens: the next power of two
    from SHORTEST_BUCKET, at most max_length."""
    bucket = SHORTEST_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max(max_length, length))


def _padded_batch(rows, batch_size: int, max_length: int) -> dict[str, np.ndarray]:
    """[batch_size, bucket] int32 arrays: each row's inputs and targets from the left, padding of
    segment 0 after them (and rows of padding alone), score_mask on the scored targets."""
    length = bucket_length(max(len(inputs) for inputs, _, _ in rows), max_length)
    batch = {
        name: np.zeros((batch_size, length), np.int32)
        for name in ("tokens", "targets", "positions", "segment_ids", "score_mask")
    }
    for row, (inputs, targets, scored) in enumerate(rows):
        size = len(inputs)
        batch["tokens"][row, :size] = inputs
        batch["targets"][row, :size] = targets
        batch["positions"][row, :size] = np.arange(size)
        batch["segment_ids"][row, :size] = 1
        batch["score_mask"][row, size - scored : size] = 1
    return batch


def _scorer(loaded: Loaded) -> Callable[[Any, dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """params, host batch → per-token log-probabilities of the targets [rows, length] float32 and
    whether each target is the most likely token [rows, length] bool, replicated (not yet
    fetched). The batch is placed on the mesh's batch sharding from every process's copy of it."""
    setup = loaded.setup
    replicated = NamedSharding(setup.mesh, PartitionSpec())

    def score(params, tokens, targets, positions, segment_ids):
        model = nnx.merge(setup.graphdef, params)
        with parallel.activation_sharding(setup.mesh, setup.rules):
            hidden = model(tokens, positions, segment_ids, return_hidden=True).hidden
            logits = step.project_logits(hidden, model.output_head())  # [batch, length, vocab]
            greedy = jnp.argmax(logits, axis=-1) == targets
        return -step.token_losses(logits, targets), greedy  # the loss's own log-probabilities

    jitted = jax.jit(
        score,
        in_shardings=(setup.param_shardings, *[setup.batch_sharding] * 4),
        out_shardings=(replicated, replicated),
    )

    def run(params, batch: dict[str, np.ndarray]):
        fields = ("tokens", "targets", "positions", "segment_ids")
        arrays = pipeline.whole_to_global(batch, setup.batch_sharding, fields)
        return jitted(params, *(arrays[field] for field in fields))

    return run


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None, include_defaults: bool = True) -> TaskManager:
    """lm-eval's index of its own tasks (thousands of YAML files: seconds to read, so built once)
    and of those in `include_path`."""
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(
    tasks: Sequence[str], include_path: str | None, option: str = "--include-path"
) -> TaskManager:
    """The task index, once every name in `tasks` is a task, group or tag in it; else a
    UserError naming the first that is not. `option`: what the user calls include_path.

    Tasks that are all in `include_path` are indexed from there alone, without reading
    lm-eval's own thousands of task files."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(
                f"{option}={include_path} is not a directory; pass the directory of your task YAML files"
            )
        local = task_manager(include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            where = f" nor in {option}={include_path}" if include_path else ""
            raise UserError(
                f"lm-eval task {task!r} is not installed{where}; check its name (lm-eval ls tasks) or "
                f"pass {option} DIR with a YAML file that defines it"
            )
    return manager


def run_tasks(
    lm: JaxlmLM,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
) -> dict[str, Any]:
    """lm-eval's results (its `simple_evaluate` dict: results, configs, versions, ...) of
    `tasks` on `lm`."""
    manager = check_tasks(tasks, include_path)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )
    if results is None:  # only on processes other than lm-eval's rank 0, which jaxlm never sets
        raise RuntimeError("lm-eval returned no results")
    return results


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """{"<task>/<metric>": value} of lm-eval's results: its "metric,filter" entries, standard
    errors left out and the default filter out of the name ("acc,none" → "acc")."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if (
                not comma
                or "stderr" in metric
                or not isinstance(value, int | float)
                or isinstance(value, bool)
            ):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            flat[f"{task}/{name}"] = float(value)
    return flat


def table(results: dict[str, Any]) -> str:
    """lm-eval's Markdown table of the results (and of the groups, where tasks form any)."""
    text = lm_eval_utils.make_table(results)
    if results.get("groups"):
        text += "\n" + lm_eval_utils.make_table(results, "groups")
    return text
