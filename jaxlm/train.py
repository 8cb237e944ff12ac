"""Training: the sharded train state built from a config, the jitted steps, and the loop around
them (the only side effects). The steps themselves are pure functions in `jaxlm.step`."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import parallel
from jaxlm.checkpoint import Checkpointer, abstract_with_shardings
from jaxlm.config import Config
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.distributed import PreemptionWatch
from jaxlm.errors import ConfigError, DataError, TrainingDiverged
from jaxlm.metrics import MetricsWriter, Progress, StepProfiler, model_flops_per_step, peak_flops_per_device
from jaxlm.model import Transformer
from jaxlm.model.layers import attention_kernel, runs_cudnn_attention
from jaxlm.optim import make_optimizer
from jaxlm.step import TrainState, make_eval_step, make_train_step

log = logging.getLogger("jaxlm")


# ---------------------------------------------------------------------------------------------
# Building the sharded state.


@dataclass
class Setup:
    """Everything compiled or sharded for one run: built before any data is read."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    init: Callable  # key → TrainState, jitted straight into its shardings
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    attention: str  # the kernel model.attention resolved to on these devices


def build(config: Config, devices: Sequence[jax.Device] | None = None) -> Setup:
    """Mesh, model definition, optimizer and the shardings of the whole train state.

    Raises ConfigError for anything the device count makes impossible, before compiling.
    """
    mesh = parallel.make_mesh(config, devices)
    rules = config.mesh.rules
    parallel.check_batch(config, mesh)
    optimizer, schedule = make_optimizer(config)

    # model.attention=auto becomes the kernel these devices run best.
    device = mesh.devices.flat[0]
    if config.model.attention == "cudnn" and not runs_cudnn_attention(device):
        raise ConfigError(
            f"model.attention=cudnn needs an NVIDIA GPU of compute capability 9.0 or newer, and these "
            f"devices are {device.device_kind}; use model.attention=auto (or xla)"
        )
    model_config = config.model.model_copy(
        update={"attention": attention_kernel(config.model.attention, device)}
    )
    abstract_model = nnx.eval_shape(lambda: Transformer(model_config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    logical_axes = jax.tree.map(
        tuple,
        nnx.to_pure_dict(nnx.get_partition_spec(abstract_params)),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )

    def init(key: jax.Array) -> TrainState:
        model = Transformer(model_config, nnx.Rngs(params=key))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract_state = jax.eval_shape(init, jax.random.key(0))
    param_shardings = parallel.shardings_from_logical(abstract_state.params, logical_axes, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    state_shardings = TrainState(replicated, param_shardings, opt_shardings)
    return Setup(
        mesh=mesh,
        graphdef=graphdef,
        init=jax.jit(init, out_shardings=state_shardings),
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_sharding=parallel.batch_sharding(mesh, rules),
        optimizer=optimizer,
        schedule=schedule,
        attention=model_config.attention,
    )


def jit_train_step(config: Config, setup: Setup) -> Callable:
    """The train step jitted onto the setup's shardings, state donated: what the loop runs and
    what `jaxlm plan` compiles for a topology."""
    step = make_train_step(
        setup.graphdef,
        setup.optimizer,
        setup.schedule,
        config.train.micro_batches,
        setup.mesh,
        config.mesh.rules,
        config.train.loss_chunk,
    )
    return jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=0,
    )


def abstract_inputs(config: Config, setup: Setup) -> tuple[TrainState, dict[str, jax.ShapeDtypeStruct]]:
    """The train state and one global batch as sharded shapes, to lower the step ahead of time
    without allocating anything."""
    shape = (config.train.global_batch_size, config.data.seq_len)
    batch = {
        field: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding)
        for field in pipeline.FIELDS
    }
    return abstract_with_shardings(setup.abstract_state, setup.state_shardings), batch


def count_params(abstract_state: TrainState) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_state.params))


def check_state_fits(setup: Setup) -> None:
    """Refuse a train state larger than the memory of the devices that hold it, before it is
    allocated: a GPU or TPU would fail to allocate it; a CPU host would swap or hang."""
    shards = jax.tree.leaves(abstract_with_shardings(setup.abstract_state, setup.state_shardings))
    per_device = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in shards)
    local = [d for d in setup.mesh.devices.flat if d.process_index == jax.process_index()]
    device = local[0]  # memory_stats answers for this process's own devices only
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats and per_device > stats["bytes_limit"]:
        raise ConfigError(
            f"the parameters and optimizer state need {per_device / 1e9:.1f} GB per device and a "
            f"{device.device_kind} has {stats['bytes_limit'] / 1e9:.1f} GB; shard them over more devices "
            "(mesh.fsdp) or make the model smaller"
        )
    if device.platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        on_host = per_device * len(local)
        if on_host > host:
            raise ConfigError(
                f"the parameters and optimizer state need {on_host / 1e9:.1f} GB on this host's CPU "
                f"devices and it has {host / 1e9:.1f} GB of memory; make the model smaller or use more hosts"
            )


# ---------------------------------------------------------------------------------------------
# The loop.


def train(config: Config, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Run (or resume) the experiment in `config`; returns the last logged metrics."""
    run_dir = Path(config.run.dir)
    setup = build(config, devices)
    check_state_fits(setup)
    tokenizer = load_tokenizer(config.data)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; raise it to at least {tokenizer.vocab_size}"
        )
    train_docs, validation_docs = sources.document_sources(config.data)
    if config.train.eval_every and not validation_docs:
        raise DataError(
            "train.eval_every is set but there are no validation documents (data.validation_fraction=0, "
            "no data.tfds_validation_split, or a corpus of one document); provide some or set train.eval_every=0"
        )

    if config.optim.warmup_steps >= config.schedule_steps:
        log.warning(
            "optim.warmup_steps=%d covers the whole %d-step schedule: the learning rate never reaches optim.lr",
            config.optim.warmup_steps,
            config.schedule_steps,
        )
    if jax.process_index() == 0:
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run.dir={run_dir} is a file, not a directory; choose another run.dir")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"run.dir={run_dir} cannot be created ({error.strerror or error}); choose a writable run.dir"
            ) from error
    log.info(
        "model: %s parameters, %s attention; mesh %s over %d devices (%s); %d train / %d validation documents",
        f"{count_params(setup.abstract_state):,}",
        setup.attention,
        dict(setup.mesh.shape),
        setup.mesh.size,
        setup.mesh.devices.flat[0].device_kind,
        len(train_docs),
        len(validation_docs) if validation_docs else 0,
    )

    data = pipeline.HostBatches(train_docs, config, tokenizer)
    checkpointer = Checkpointer(config)  # even with checkpoint.every=0: resume, and preemption saves
    try:
        state = _restore_or_init(config, setup, checkpointer, data)
        if jax.process_index() == 0:  # only once the checkpoint has accepted this config
            (run_dir / "config.yaml").write_text(config.to_yaml())
        checkpointer.start_pinning(state)  # overlaps compilation; see Checkpointer.start_pinning
        return _loop(config, setup, state, data, checkpointer, validation_docs, tokenizer, run_dir)
    finally:
        data.close()
        checkpointer.close()


def _restore_or_init(config: Config, setup: Setup, checkpointer: Checkpointer, data) -> TrainState:
    latest = checkpointer.latest_step()
    if latest is None:
        return setup.init(jax.random.key(config.train.seed))
    log.info("resuming from checkpoint step %d in %s", latest, checkpointer.directory)
    target = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    return checkpointer.restore(latest, target, data, config)


def _loop(config, setup: Setup, state, data, checkpointer, validation_docs, tokenizer, run_dir) -> dict:
    train_config = config.train
    first_step = int(jax.device_get(state.step))
    if first_step >= train_config.steps:
        log.info(
            "run is already at step %d of train.steps=%d; nothing to do",
            first_step,
            train_config.steps,
        )
        return {"step": first_step}

    mesh, rules = setup.mesh, config.mesh.rules
    # Both steps compile before the first step, so no compilation falls inside the run's timing
    # and an eval step that cannot compile fails now, not at the first evaluation.
    abstract_state, abstract_batch = abstract_inputs(config, setup)
    train_step = _compile("train", jit_train_step(config, setup), abstract_state, abstract_batch)
    evaluate = None
    if train_config.eval_every:
        # Fixed validation batches, placed on the devices once and reused by every eval.
        eval_batches = [
            pipeline.to_global(batch, setup.batch_sharding)
            for batch in pipeline.eval_host_batches(validation_docs, config, tokenizer)
        ]
        eval_step = _compile(
            "eval",
            jax.jit(
                make_eval_step(setup.graphdef, tokenizer.token_bytes(), mesh, rules, train_config.loss_chunk)
            ),
            abstract_state.params,
            abstract_batch,
        )

        def evaluate(params) -> dict[str, float]:
            # Dispatch every batch, then fetch the per-batch sums once: one host sync per eval.
            sums = jax.device_get([eval_step(params, batch) for batch in eval_batches])
            loss_sum, tokens, byte_count = np.sum(np.asarray(sums, np.float64), axis=0)
            return {
                "eval_loss": loss_sum / tokens,
                "eval_bits_per_byte": loss_sum / math.log(2) / max(byte_count, 1),
            }

    tokens_per_step = train_config.global_batch_size * config.data.seq_len
    peak_flops = peak_flops_per_device(setup.mesh.devices.flat[0], config) * setup.mesh.size
    flops_per_step = model_flops_per_step(config)
    writer = MetricsWriter(run_dir)
    progress = Progress(first_step, train_config.steps)
    preemption = PreemptionWatch(config.distributed.preemption_grace_s)
    profiler = StepProfiler(train_config.profile_steps, run_dir / "profile")
    last_logged: dict[str, Any] = {"step": first_step}
    check_documents = setup.attention == "cudnn"  # until a row holds too many, once
    checkpointer.wait_for_pinning()  # the first step donates the state it reads
    try:
        window_start, window_first_step = None, first_step
        for step in range(first_step + 1, train_config.steps + 1):
            profiler.before(step)
            host_batch = next(data)
            if check_documents:
                check_documents = _documents_fit(host_batch, config.model.max_documents, step)
            batch = pipeline.to_global(host_batch, setup.batch_sharding)
            state, metrics = train_step(state, batch)
            profiler.after(step, metrics)
            if window_start is None:  # the first step warms up; time the rest
                jax.block_until_ready(metrics)
                log.info("first step took %.1fs", time.perf_counter() - progress.started)
                progress.first_step_done(step)
                window_start, window_first_step = time.perf_counter(), step
            if step % train_config.log_every == 0 or step == train_config.steps:
                values = {name: float(value) for name, value in jax.device_get(metrics).items()}
                _check_finite(values["loss"], step, checkpointer)
                now = time.perf_counter()
                steps_in_window = step - window_first_step
                seconds = (now - window_start) / max(steps_in_window, 1)
                record = {
                    **values,
                    "tokens_per_s": tokens_per_step / seconds if steps_in_window else 0.0,
                    "mfu": flops_per_step / seconds / peak_flops if steps_in_window and peak_flops else 0.0,
                    "step_time_s": seconds if steps_in_window else 0.0,
                    "tokens": step * tokens_per_step,
                }
                writer.write(step, record)
                progress.update(step, record["loss"], record["tokens_per_s"])
                last_logged = {"step": step, **record}
                window_start, window_first_step = time.perf_counter(), step
            else:
                progress.update(step)
            if evaluate and (step % train_config.eval_every == 0 or step == train_config.steps):
                eval_start = time.perf_counter()
                eval_metrics = evaluate(state.params)
                writer.write(step, eval_metrics)
                last_logged.update(eval_metrics)
                if jax.process_index() == 0:
                    log.info("step %d  eval_loss %.4f  bits/byte %.4f", step, *eval_metrics.values())
                window_start += time.perf_counter() - eval_start  # eval time is not train time
            preempted = preemption.reached(step)
            if preempted:
                preemption.start_grace_timer()
            if preempted or _checkpoint_due(config, step):
                _check_finite(float(jax.device_get(metrics["loss"])), step, checkpointer)
                checkpointer.save(step, state, data, config)
            if preempted:
                log.warning("preempted: stopping at step %d after saving it", step)
                last_logged["preempted_at"] = step
                break
    finally:
        profiler.close()
        preemption.close()
        progress.close()
        writer.close()
    if jax.process_index() == 0:
        stopped_at = last_logged.get("preempted_at", last_logged["step"])
        log.info(
            "%s at step %d (last logged loss %.4f); metrics in %s, TensorBoard events in %s",
            "preempted, resumable with the same command," if "preempted_at" in last_logged else "done",
            stopped_at,
            last_logged.get("loss", float("nan")),
            run_dir / "metrics.jsonl",
            run_dir / "tensorboard",
        )
    return last_logged


def _compile(name: str, jitted: Callable, *abstract_args) -> Callable:
    started = time.perf_counter()
    compiled = jitted.lower(*abstract_args).compile()
    log.info("compiled the %s step in %.1fs", name, time.perf_counter() - started)
    return compiled


def _documents_fit(host_batch: pipeline.Batch, max_documents: int, step: int) -> bool:
    """Whether this batch's rows fit cuDNN attention's document slots; warns (the caller then
    stops asking) the first time one does not."""
    most = pipeline.most_documents_per_row(host_batch["segment_ids"])
    if most <= max_documents:
        return True
    log.warning(
        "step %d: a packed row holds %d documents, more than model.max_documents=%d: cuDNN attention "
        "lets the last ones of such rows attend to each other; raise model.max_documents to keep them "
        "apart (its backward memory grows with it). Warned once.",
        step,
        most,
        max_documents,
    )
    return False


def _checkpoint_due(config: Config, step: int) -> bool:
    every = config.checkpoint.every
    return bool(every) and (step % every == 0 or step == config.train.steps)


def _check_finite(loss: float, step: int, checkpointer: Checkpointer) -> None:
    if math.isfinite(loss):
        return
    kept = checkpointer.latest_step()
    where = (
        f"the last checkpoint (step {kept}) is intact" if kept is not None else "no checkpoint was written"
    )
    raise TrainingDiverged(
        f"loss is {loss} at step {step}; {where}. Lower optim.lr, raise optim.warmup_steps or "
        "check the data, then run again"
    )
