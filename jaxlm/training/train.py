"""The training loop: step, log, evaluate, save, stop. Everything it runs is built beforehand
(`jaxlm.training.setup`), the step itself is pure (`jaxlm.training.step`), and each of the loop's side effects is
a component that owns its cadence: `StepLogger`, `Evaluator`, `Checkpointer`, `StepProfiler`,
`PreemptionWatch`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from etils import epath

from jaxlm import storage
from jaxlm.config import Config
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizers import Tokenizer, load_tokenizer
from jaxlm.distributed import PreemptionWatch
from jaxlm.errors import ConfigError, DataError, cause
from jaxlm.evaluation.evaluate import Evaluator, check_eval_tasks
from jaxlm.inference import loading
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.metrics import StepLogger, StepProfiler
from jaxlm.training.setup import (
    TrainSetup,
    abstract_inputs,
    build_train,
    check_state_fits,
    compile_ahead,
    count_params,
    jit_train_step,
)

log = logging.getLogger("jaxlm")


@dataclass
class TrainResult:
    step: int  # the last step trained (the checkpoint's, when there was nothing left to train)
    metrics: dict[str, Any] = field(default_factory=dict)  # the last logged train and eval metrics
    preempted: bool = False  # stopped by SIGTERM after saving `step`: resumable
    first_step_done_at: float | None = None  # time.perf_counter() when the first step finished
    loop_done_at: float | None = None  # and when the loop did, before waiting for the last save


def train(
    config: Config, devices: Sequence[jax.Device] | None = None, *, given: Collection[str] = ()
) -> TrainResult:
    """Run (or resume) the experiment in `config`. With model.init_from, its source is opened once,
    here: the config takes its architecture and tokenizer, and a fresh run its parameters. `given`:
    the dotted keys set on the command line (`loading.resolve_init_from`)."""
    config, source = loading.resolve_init_from(config, given)
    check_eval_tasks(config)
    setup, tokenizer, corpus, run_dir = _prepare(config, devices)
    shape = (config.train.global_batch_size, config.data.seq_len)
    data = pipeline.HostBatches(corpus, config, tokenizer, setup.model.process_rows(shape))
    checkpointer = Checkpointer(config)  # even with checkpoint.every=0: resume, and preemption saves
    # From here a SIGTERM (during restore or compilation too) stops the run after its next step.
    preemption = PreemptionWatch(config.distributed.preemption_grace_s)
    try:
        state = checkpointer.restore_or_init(setup, data, _init_params(source, setup))
        if jax.process_index() == 0:  # only once the checkpoint has accepted this config
            _write_config(config, run_dir)
        first_step = int(jax.device_get(state.step))
        if first_step >= config.train.steps:
            log.info(
                "run is already at step %d of train.steps=%d; nothing to do", first_step, config.train.steps
            )
            return TrainResult(first_step)
        checkpointer.start_pinning(state)  # overlaps compilation; see Checkpointer.start_pinning
        # Both steps compile before the first step, so no compilation falls inside the run's timing.
        train_step = compile_ahead("train", jit_train_step(config, setup), *abstract_inputs(config, setup))
        evaluator = Evaluator(config, setup.model, corpus, tokenizer)
        return _loop(config, setup, state, train_step, evaluator, data, checkpointer, preemption, run_dir)
    finally:
        preemption.close()
        data.close()
        checkpointer.close()


def _loop(
    config, setup: TrainSetup, state, train_step, evaluator, data, checkpointer, preemption, run_dir
) -> TrainResult:
    first_step = int(jax.device_get(state.step))
    batches = _GlobalBatches(data, setup, config)
    logger = StepLogger(
        config, setup.mesh, run_dir, first_step, checkpointer.refuse_diverged, data.counts.seen
    )
    profiler = StepProfiler(config.train.profile_steps, run_dir / "profile")
    checkpointer.wait_for_pinning()  # the first step donates the state it reads
    step, preempted = first_step, False
    try:
        for step in range(first_step + 1, config.train.steps + 1):
            profiler.before(step)
            state, metrics = train_step(state, next(batches))
            profiler.after(step, metrics)
            logger.step_done(step, metrics)
            if evaluator.due(step):
                with logger.paused():
                    logger.write_eval(step, evaluator.evaluate(state.params))
            if preemption.reached(step):
                preempted = True
                checkpointer.save_and_finish(step, state, data, metrics["loss"], within_s=preemption.grace_s)
                log.warning("preempted: stopping at step %d after saving it", step)
                break
            checkpointer.maybe_save(step, state, data, metrics["loss"])
    finally:
        profiler.close()
        logger.close()
    result = TrainResult(step, logger.last, preempted, logger.first_step_done_at, time.perf_counter())
    _log_end(result, run_dir)
    return result


def _init_params(source: loading.Source | None, setup: TrainSetup) -> Callable[[], Any] | None:
    """What a run without checkpoints of its own starts from: model.init_from's parameters."""
    if source is None:
        return None

    def read() -> Any:
        log.info("starting from the parameters of model.init_from=%s", source.path)
        return source.read_params(setup.model)

    return read


def _prepare(config: Config, devices: Sequence[jax.Device] | None):
    """The set-up, tokenizer, documents and run directory, each checked: any of them can refuse
    the config before a parameter is allocated."""
    setup = build_train(config, devices)
    check_state_fits(setup)
    tokenizer, corpus = _data(config)
    if config.optim.warmup_steps >= config.schedule_steps:
        log.warning(
            "optim.warmup_steps=%d covers the whole %d-step schedule: the learning rate never reaches optim.lr",
            config.optim.warmup_steps,
            config.schedule_steps,
        )
    run_dir = _make_run_dir(config)
    log.info(
        "model: %s, %s, %s attention; mesh %s over %d devices (%s); %d train / %d validation documents",
        config.model.family,
        _parameter_count(setup),
        setup.model.attention,
        dict(setup.mesh.shape),
        setup.mesh.size,
        setup.mesh.devices.flat[0].device_kind,
        sum(len(part.train) for part in corpus),
        sum(len(part.validation) for part in corpus if part.validation),
    )
    if len(corpus) > 1:
        log.info(
            "data.mixture: %s",
            ", ".join(
                f"{part.name} {part.weight:.1%} of rows ({len(part.train)} documents)" for part in corpus
            ),
        )
    return setup, tokenizer, corpus, run_dir


def _parameter_count(setup: TrainSetup) -> str:
    """The model's parameters, and with LoRA how many of them train."""
    total = f"{count_params(setup.abstract_state.params):,} parameters"
    if not setup.model.lora:
        return total
    trained = count_params(setup.model.trainable(setup.abstract_state.params)[0])
    return f"{total} (LoRA rank {setup.model.lora.rank}: {trained:,} of them train)"


def _data(config: Config) -> tuple[Tokenizer, list[sources.Part]]:
    """The tokenizer and the corpus (training and validation documents), checked against the config."""
    tokenizer = load_tokenizer(config.data)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; raise it to at least {tokenizer.vocab_size}"
        )
    corpus = sources.corpus(config.data)
    if config.train.eval_every and not any(part.validation for part in corpus):
        raise DataError(
            "train.eval_every is set but there are no validation documents (data.validation_fraction=0, "
            "no data.tfds_validation_split, or a corpus of one document); provide some or set train.eval_every=0"
        )
    return tokenizer, corpus


def _make_run_dir(config: Config) -> epath.Path:
    """The run directory, a local path or gs:// URL, checked (and created) by process 0."""
    if storage.is_bucket(config.run.dir):
        if jax.process_index() == 0:
            storage.check_bucket(config.run.dir, "run.dir")
        return epath.Path(config.run.dir)  # a bucket has no directories to create
    run_dir = Path(config.run.dir)
    if jax.process_index() == 0:
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run.dir={run_dir} is a file, not a directory; choose another run.dir")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"run.dir={run_dir} cannot be created ({error.strerror or error}); choose a writable run.dir"
            ) from error
    return epath.Path(run_dir)


def _write_config(config: Config, run_dir: epath.Path) -> None:
    path = run_dir / "config.yaml"
    try:
        path.write_text(config.to_yaml())
    except Exception as error:
        raise ConfigError(
            f"cannot write {path} ({cause(error)}); choose a run.dir this machine can write to"
        ) from error


class _GlobalBatches:
    """This process's host batches as global arrays on the batch sharding. With cuDNN attention
    it checks rows against its document slots (attention.max_documents), until one does not fit."""

    def __init__(self, data: pipeline.HostBatches, setup: TrainSetup, config: Config):
        self.data, self.sharding = data, setup.batch_sharding
        self.shape = (config.train.global_batch_size, config.data.seq_len)
        self.max_documents = setup.model.kernel.max_documents
        self.check_documents = setup.model.attention == "cudnn"

    def __next__(self) -> dict[str, jax.Array]:
        host_batch = next(self.data)
        if self.check_documents:
            self.check_documents = _documents_fit(host_batch, self.max_documents)
        return pipeline.to_global(host_batch, self.sharding, self.shape)


def _documents_fit(host_batch: pipeline.Batch, max_documents: int) -> bool:
    """Whether this batch's rows fit cuDNN attention's document slots; warns (the caller then
    stops asking) the first time one does not."""
    most = pipeline.most_documents_per_row(host_batch["segment_ids"])
    if most <= max_documents:
        return True
    log.warning(
        "a packed row holds %d documents, more than attention.max_documents=%d: cuDNN attention "
        "lets the last ones of such rows attend to each other; raise attention.max_documents to keep them "
        "apart (its backward memory grows with it). Warned once.",
        most,
        max_documents,
    )
    return False


def _log_end(result: TrainResult, run_dir: epath.Path) -> None:
    if jax.process_index() != 0:
        return
    log.info(
        "%s at step %d (last logged loss %.4f); metrics in %s, TensorBoard events in %s",
        "preempted, resumable with the same command," if result.preempted else "done",
        result.step,
        result.metrics.get("loss", float("nan")),
        run_dir / "metrics.jsonl",
        run_dir / "tensorboard",
    )
