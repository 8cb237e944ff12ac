"""Evaluation: in training, loss and bits per byte on fixed validation batches and lm-eval tasks
at the same cadence (`Evaluator`); for `jaxlm eval`, the loss, perplexity and bits per byte of a
model over every example of a dataset (`evaluate_data`). lm-eval itself is imported only when
tasks are asked for (`lm_eval_adapter`): it is the `eval` extra, not part of jaxlm's core."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxlm import parallel
from jaxlm.config import Config
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.errors import UserError
from jaxlm.evaluation.progress import progress_bar
from jaxlm.training.setup import ModelSetup, abstract_batch, compile_ahead, jit_eval_step, with_shardings

if TYPE_CHECKING:
    from jaxlm.inference.loading import Loaded

log = logging.getLogger("jaxlm")


def lm_eval_adapter() -> ModuleType:
    """jaxlm.evaluation.lm_eval_adapter, or a UserError naming the extra that installs lm-eval."""
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "lm_eval":
            raise
        raise UserError(
            'lm-eval tasks need lm-eval, which jaxlm\'s eval extra installs: pip install -e ".[eval]"'
        ) from None
    from jaxlm.evaluation import lm_eval_adapter

    return lm_eval_adapter


def check_eval_tasks(config: Config) -> None:
    """Refuse train.eval_tasks that lm-eval does not have (or lm-eval itself missing), in one line,
    before a run allocates or compiles anything."""
    if config.train.eval_tasks:
        include_path = config.train.eval_tasks_include_path
        lm_eval_adapter().check_tasks(
            config.train.eval_tasks, include_path, option="train.eval_tasks_include_path"
        )


class Evaluator:
    """Evaluates every train.eval_every steps and at the last step (never with eval_every 0),
    on the same validation batches each time, placed on the devices once; and, with
    train.eval_tasks, runs those lm-eval tasks on the current parameters."""

    def __init__(self, config: Config, setup: ModelSetup, corpus: pipeline.Corpus, tokenizer: Tokenizer):
        self.every, self.last_step = config.train.eval_every, config.train.steps
        if not self.every:
            return
        self._tasks = _TrainingTasks(config, setup, tokenizer) if config.train.eval_tasks else None
        shape = (config.train.global_batch_size, config.data.seq_len)
        self._batches = [
            pipeline.to_global(batch, setup.batch_sharding, shape)
            for batch in pipeline.eval_host_batches(corpus, config, tokenizer, setup.process_rows(shape))
        ]
        # Compiled now, so an eval step that cannot compile fails before the first train step.
        self._step = compile_ahead(
            "eval",
            jit_eval_step(config, setup, tokenizer.token_bytes()),
            with_shardings(setup.abstract_params, setup.param_shardings),
            abstract_batch(config, setup.batch_sharding),
        )

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last_step)

    def evaluate(self, params: Any) -> dict[str, float]:
        # Dispatch every batch, then fetch the per-batch sums once: one host sync per eval.
        sums = jax.device_get([self._step(params, batch) for batch in self._batches])
        loss_sum, tokens, byte_count = np.sum(np.asarray(sums, np.float64), axis=0)
        scores = {
            "eval_loss": loss_sum / tokens,
            "eval_bits_per_byte": loss_sum / math.log(2) / max(byte_count, 1),
        }
        if self._tasks is not None:
            scores.update(self._tasks.scores(params))
        return scores


class _TrainingTasks:
    """train.eval_tasks on the run's own model: its tokenizer, documents starting as in training,
    at most data.seq_len tokens."""

    def __init__(self, config: Config, setup: ModelSetup, tokenizer: Tokenizer):
        from jaxlm.inference.loading import Loaded

        self.adapter = lm_eval_adapter()
        train = config.train
        self.tasks, self.include_path = train.eval_tasks, train.eval_tasks_include_path
        self.fewshot, self.limit = train.eval_tasks_fewshot, train.eval_tasks_limit
        loaded = Loaded(config, setup, None, tokenizer, (tokenizer.eos_id,))
        self.lm = self.adapter.JaxlmLM(loaded, batch_size=train.global_batch_size, show_progress=False)

    def scores(self, params: Any) -> dict[str, float]:
        self.lm.loaded = dataclasses.replace(self.lm.loaded, params=params)
        results = self.adapter.run_tasks(
            self.lm,
            self.tasks,
            num_fewshot=self.fewshot,
            limit=self.limit,
            include_path=self.include_path,
            bootstrap_iters=0,
        )
        return {f"eval/{name}": value for name, value in self.adapter.flat_scores(results).items()}


@dataclasses.dataclass
class DataScores:
    """A model's scores over every example of a dataset."""

    loss: float  # mean nats per trained target
    perplexity: float  # exp(loss)
    bits_per_byte: float  # the summed loss in bits over the UTF-8 bytes of the trained targets
    trained_tokens: int
    bytes: int
    rows: int  # packed [seq_len] rows scored

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def evaluate_data(
    loaded: Loaded, path: str, *, batch_size: int = 8, show_progress: bool = True
) -> DataScores:
    """Loss, perplexity and bits per byte of `loaded` over every example of `path` (a .txt,
    .jsonl or .parquet file, or a directory of them) exactly once: packed into rows as training
    packs them, prompts and non-assistant turns of instruction records not scored."""
    config = loaded.config.model_copy(
        update={"data": loaded.config.data.model_copy(update={"path": path, "mixture": []})}
    )
    source = sources.DocumentSource(
        sources.list_documents(path, config.data.text_field), config.data.text_field
    )
    if not len(source):
        raise UserError(
            f"--data={path} holds no examples; give a file or directory of .txt, .jsonl or .parquet"
        )
    setup = loaded.setup
    rows_per_batch = parallel.rows_split_evenly(batch_size, setup.mesh, setup.rules)
    step = jit_eval_step(config, setup, loaded.tokenizer.token_bytes())
    rows = pipeline.evaluation_rows(source, config, loaded.tokenizer)
    totals, pending, row_count = np.zeros(3, np.float64), None, 0
    with progress_bar(show_progress) as progress:
        task = progress.add_task("eval rows", total=None)
        for batch, real_rows in _batches(rows, rows_per_batch, config.data.seq_len):
            sums = step(loaded.params, pipeline.whole_to_global(batch, setup.batch_sharding))
            if pending is not None:  # fetched one batch behind, so the device never waits on the host
                totals += np.asarray(jax.device_get(pending), np.float64)
            pending, row_count = sums, row_count + real_rows
            progress.advance(task, real_rows)
    if pending is not None:
        totals += np.asarray(jax.device_get(pending), np.float64)
    loss_sum, tokens, byte_count = totals
    if not tokens:
        raise UserError(
            f"--data={path} has no scored tokens (every example is empty or masked); check its records"
        )
    loss = loss_sum / tokens
    return DataScores(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=loss_sum / math.log(2) / max(byte_count, 1),
        trained_tokens=int(tokens),
        bytes=int(byte_count),
        rows=row_count,
    )


def _batches(
    rows: Iterable[pipeline.Batch], rows_per_batch: int, seq_len: int
) -> Iterator[tuple[pipeline.Batch, int]]:
    """[rows_per_batch, seq_len] host batches of `rows`, the last padded with rows that score
    nothing (loss_mask 0, segment 0), and how many rows of each are real."""
    chunk: list[pipeline.Batch] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == rows_per_batch:
            yield _stack(chunk, rows_per_batch, seq_len), len(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk, rows_per_batch, seq_len), len(chunk)


def _stack(chunk: list[pipeline.Batch], rows_per_batch: int, seq_len: int) -> pipeline.Batch:
    batch = {field: np.zeros((rows_per_batch, seq_len), np.int32) for field in pipeline.FIELDS}
    for index, row in enumerate(chunk):
        for field in pipeline.FIELDS:
            batch[field][index] = row[field]
    return batch


# Keys `jaxlm eval` takes as key=value: how the model runs and how data is read, never what it is.
EVAL_OVERRIDES = ("mesh.", "data.", "model.dtype=", "attention.", "train.loss_chunk=", "distributed.")


def check_overrides(overrides: Iterable[str]) -> None:
    """Refuse a key=value that `jaxlm eval` does not take, in one line."""
    others = [override for override in overrides if not override.startswith(EVAL_OVERRIDES)]
    if others:
        raise UserError(
            f"eval takes PATH, options and mesh.*, data.*, distributed.*, attention.*, model.dtype or "
            f"train.loss_chunk overrides, not {' '.join(others)}"
        )


def run_eval(
    loaded: Loaded,
    *,
    data: str | None = None,
    tasks: list[str] = (),
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    bootstrap_iters: int = 100000,
) -> dict[str, Any]:
    """What `jaxlm eval` reports, as a JSON-ready dict: "data" (DataScores of `data`) and/or
    "tasks" (lm-eval's results, n-shot, configs and versions of `tasks`), with the model's config
    and the versions of what ran it; the text of the report under "table"."""
    report: dict[str, Any] = {"config": loaded.config.to_dict(), "versions": _versions()}
    lines = []
    if data is not None:
        scores = evaluate_data(loaded, data, batch_size=batch_size)
        report["data"] = {"path": data, **scores.as_dict()}
        lines.append(
            f"{data}: loss {scores.loss:.4f}  perplexity {scores.perplexity:.4f}  bits/byte "
            f"{scores.bits_per_byte:.4f}  ({scores.trained_tokens:,} scored tokens in {scores.rows:,} rows)"
        )
    if tasks:
        adapter = lm_eval_adapter()
        lm = adapter.JaxlmLM(loaded, batch_size=batch_size, max_length=max_length)
        results = adapter.run_tasks(
            lm,
            tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            include_path=include_path,
            bootstrap_iters=bootstrap_iters,
        )
        report["tasks"] = {
            key: results[key]
            for key in ("results", "groups", "n-shot", "configs", "versions", "n-samples")
            if key in results
        }
        report["versions"]["lm_eval"] = adapter.lm_eval.__version__
        lines.append(adapter.table(results))
    report["table"] = "\n".join(lines)
    return report


def _versions() -> dict[str, str]:
    import flax

    import jaxlm

    return {"jaxlm": jaxlm.__version__, "jax": jax.__version__, "flax": flax.__version__}
