"""Orbax checkpoints of a run: train state, every process's data iterator, and the config.

The `Checkpointer` owns its cadence: the loop offers it every step (`maybe_save`). Saves are
asynchronous (training goes on while arrays are written) and atomic: Orbax writes a step to a
temporary directory (or, on object stores, marks it committed when complete), so `latest_step`
never returns a half-written step (those are reported and skipped). Restores place every array
directly onto the shardings of the current mesh, whatever mesh or process count saved it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import SingleDeviceSharding

from jaxlm import storage
from jaxlm.config import DEFAULT_FAMILY, Config, without_moved_keys
from jaxlm.errors import PreemptionGraceExpired, TrainingDiverged, UserError, cause
from jaxlm.model import registry
from jaxlm.training import lora
from jaxlm.training.setup import TrainSetup, with_shardings

log = logging.getLogger("jaxlm")


class DataPositionHandler(ocp.CheckpointHandler):
    """Saves where each process's data streams are, one file per process,
    `streams_<first>-<last>-of-<streams>.json`, so that any process layout can restore them."""

    def save(self, directory: epath.Path, args: DataPositionSave) -> None:
        batches = args.item
        first, last = batches.stream_indices[0], batches.stream_indices[-1]
        path = directory / f"streams_{first}-{last}-of-{batches.stream_count}.json"
        path.write_text(json.dumps(batches.position()))

    def restore(self, directory: epath.Path, args: DataPositionRestore) -> bool:
        """Restore the streams in place; False when the checkpoint's batches had another number
        of streams (rows): another train.global_batch_size, or a checkpoint of older jaxlm."""
        batches = args.item
        files = [
            (int(m.group(1)), path) for path in directory.iterdir() if (m := _POSITION_FILE.match(path.name))
        ]
        if not files and not any(path.name.startswith("shard_") for path in directory.iterdir()):
            raise FileNotFoundError(
                f"no data position files (streams_<first>-<last>-of-<n>.json) in {directory}"
            )
        ours = [path for streams, path in files if streams == batches.stream_count]
        if not ours:
            return False
        batches.restore_position([json.loads(path.read_text()) for path in ours])
        return True


_POSITION_FILE = re.compile(r"streams_\d+-\d+-of-(\d+)\.json")


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataPositionSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataPositionRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    def __init__(self, config: Config):
        self.directory = config.checkpoint_dir
        if storage.is_bucket(self.directory):
            key = "checkpoint.dir" if config.checkpoint.dir else "run.dir"
            storage.check_bucket(config.checkpoint.dir or config.run.dir, key)
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(
                f"checkpoint.dir={self.directory} is a file, not a directory; point checkpoint.dir "
                "(or run.dir) elsewhere"
            )
        if jax.process_index() == 0 and self.directory.is_dir():
            for incomplete in sorted(ocp.path.step.tmp_checkpoints(self.directory)):
                log.warning(
                    "ignoring incomplete checkpoint %s (a save that was interrupted)",
                    self.directory / incomplete,
                )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=config.checkpoint.async_save,
            create=True,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as error:
            raise UserError(
                f"checkpoint.dir={self.directory} cannot be created ({error.strerror or error}); "
                "point checkpoint.dir (or run.dir) at a writable directory"
            ) from error
        self.config = config
        self._pinning: threading.Thread | None = None
        self._abandoned = False  # a preemption save outlived its grace: never wait for it again
        self._writing: int | None = None  # the step being written in the background
        self._failed = False  # a save failed and was reported: nothing more to wait for

    def start_pinning(self, state: Any) -> None:
        """Pin the host memory the first save needs now, in the background, where saves use it.

        On GPUs Orbax copies every save into `pinned_host` memory, and the first copy has to pin
        that much host RAM first (about 0.6 s per GB on an H100 host: 10 s for a 1B model's 15 GB
        of state), holding the first save, and training, up. Copied once here, while the steps
        compile, the host allocator keeps the pinned memory for every later save. Call
        `wait_for_pinning` before the state is donated to a step. Nothing to do where Orbax
        does not pin, or where the run saves only when preempted (checkpoint.every=0).
        """
        if self.config.checkpoint.every and orbax_pins_host_memory(state):
            self._pinning = pin_host_memory(state)

    def wait_for_pinning(self) -> None:
        if self._pinning is not None:
            self._pinning.join()
            self._pinning = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_or_init(
        self, setup: TrainSetup, data_iterator: Any, init_params: Callable[[], Any] | None = None
    ) -> Any:
        """The newest checkpoint's train state on the setup's shardings (and the data iterator at
        its position), or a fresh one: at step 0, with `init_params()`'s parameters if given (the
        base model's, under fresh LoRA adapters or those of optim.lora.init_from), or random ones."""
        latest = self.latest_step()
        if latest is None and init_params is not None:
            adapters = self.config.optim.lora.init_from
            if adapters:
                from jaxlm.hf.peft import read_adapter  # the PEFT format is an edge of jaxlm

                log.info("starting the LoRA adapters from optim.lora.init_from=%s", adapters)
                return setup.start(init_params(), read_adapter(adapters, setup.model))
            return setup.start(init_params())
        if latest is None:
            return setup.init(jax.random.key(self.config.train.seed))
        log.info("resuming from checkpoint step %d in %s", latest, self.directory)
        target = with_shardings(setup.abstract_state, setup.state_shardings)
        return self.restore(latest, target, data_iterator)

    def maybe_save(self, step: int, state: Any, data_iterator: Any, loss: jax.Array) -> bool:
        """Save `step` when the cadence says so (every checkpoint.every steps, and the last);
        never a diverged state. Returns whether it saved."""
        every, last = self.config.checkpoint.every, self.config.train.steps
        if not (every and (step % every == 0 or step == last)):
            return False
        self.refuse_diverged(float(jax.device_get(loss)), step)
        self.save(step, state, data_iterator)
        return True

    def save_and_finish(
        self, step: int, state: Any, data_iterator: Any, loss: jax.Array, within_s: float
    ) -> None:
        """Save `step` and wait until it is written, all within `within_s` seconds (a preempted
        host is about to vanish): past that, raise PreemptionGraceExpired and never wait for the
        write again."""
        deadline = time.monotonic() + within_s
        self.refuse_diverged(float(jax.device_get(loss)), step)
        self.save(step, state, data_iterator)
        failures: list[Exception] = []

        def wait() -> None:
            try:
                self._wait_for_writes()
            except Exception as error:
                failures.append(error)

        writer = threading.Thread(target=wait, daemon=True)
        writer.start()
        writer.join(max(deadline - time.monotonic(), 0.0))
        if failures:
            raise failures[0]
        if writer.is_alive():
            self._abandoned = True
            kept = [saved for saved in self._manager.all_steps() if saved != step]
            previous = f"step {max(kept)}" if kept else "none"
            raise PreemptionGraceExpired(
                f"the preemption checkpoint of step {step} was not written within "
                f"distributed.preemption_grace_s={within_s:g}s; the previous complete checkpoint "
                f"({previous}) is kept. Raise distributed.preemption_grace_s if the host gives more notice"
            )

    def refuse_diverged(self, loss: float, step: int) -> None:
        """Stop the run at a non-finite loss, before anything of it is saved."""
        if math.isfinite(loss):
            return
        kept = self.latest_step()
        where = (
            f"the last checkpoint (step {kept}) is intact"
            if kept is not None
            else "no checkpoint was written"
        )
        raise TrainingDiverged(
            f"loss is {loss} at step {step}; {where}. Lower optim.lr, raise optim.warmup_steps or "
            "check the data, then run again"
        )

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Start writing `step`; a `UserError` if the previous save, or this one's start, failed."""
        self.wait_for_pinning()
        started = time.perf_counter()
        self._wait_for_writes()
        self._writing = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=DataPositionSave(data_iterator),
                    config=ocp.args.JsonSave(self.config.to_dict()),
                ),
                force=True,
            )
        except jax.errors.JaxRuntimeError:
            raise  # a collective of the save failed: another process is gone (jax.distributed says so)
        except Exception as error:
            raise self._save_failed(error) from error
        log.info(
            "checkpoint of step %d: training waited %.2fs for it%s",
            step,
            time.perf_counter() - started,
            " (written in the background)" if self.config.checkpoint.async_save else "",
        )

    def _wait_for_writes(self) -> None:
        """Wait for the save in progress; a `UserError` if it could not be written."""
        if self._failed:
            return
        try:
            self._manager.wait_until_finished()
        except jax.errors.JaxRuntimeError:
            raise  # a collective of the save failed: another process is gone (jax.distributed says so)
        except Exception as error:
            raise self._save_failed(error) from error

    def _save_failed(self, error: Exception) -> UserError:
        """Note that the save failed (there is nothing more to wait for) and say so in one line:
        Orbax marks a step complete only once all of it is written, so the run resumes from the
        one before."""
        self._failed = True
        kept = [step for step in self._manager.all_steps() if step != self._writing]
        previous = f"step {max(kept)}" if kept else "none"
        return UserError(
            f"checkpoint step {self._writing} could not be written to {self.directory} ({cause(error)}); "
            f"the last complete checkpoint is {previous}. Check the storage (and this machine's access to it), "
            "then run again to resume from it"
        )

    def saved_config(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """The train state at `step`, placed on the shardings in `abstract_state`; the data
        iterator is restored in place. A step that cannot be read (damaged or deleted files) is a
        `UserError` naming it and the step an older checkpoint would resume from."""
        try:
            return self._restore(step, abstract_state, data_iterator)
        except UserError:
            raise
        except Exception as error:
            log.debug("restoring checkpoint step %d failed", step, exc_info=True)
            raise UserError(self._unreadable(step, error)) from error

    def _unreadable(self, step: int, error: BaseException) -> str:
        step_dir = self.directory / str(step)
        older = [s for s in self._manager.all_steps() if s < step]
        then = f"resume from step {max(older)}" if older else "start again from step 0"
        move = "gcloud storage mv" if storage.is_bucket(self.directory) else "mv"
        return (
            f"checkpoint step {step} in {self.directory} cannot be restored ({cause(error)}); "
            f"if it is damaged, move it aside ({move} {step_dir} {self.directory / f'damaged-{step}'}) to {then}"
        )

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        saved, current = self.saved_config(step), self.config.to_dict()
        saved_model = {"family": DEFAULT_FAMILY, **without_moved_keys(saved.get("model", {}))}
        saved_model = _with_defaults(saved_model)  # keys added since, at what the saved model had
        model = current["model"]
        changed = registry.parameter_keys_differ(registry.get(model["family"]), saved_model, model)
        if changed:
            raise UserError(
                f"checkpoint {self.directory / str(step)} was saved with a different model "
                f"(model.{', model.'.join(changed)} differ); use its model config or a new run.dir"
            )
        _refuse_other_adapters(saved, self.config, self.directory / str(step))
        _report_changes(saved, current, self.config.schedule_steps)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=DataPositionRestore(data_iterator),
            ),
        )
        if not restored.data:
            log.warning(
                "checkpoint step %d holds the data position of batches of another number of rows than "
                "this run's %d (train.global_batch_size changed, or an older jaxlm wrote it): the model and "
                "optimizer state are restored, the data starts again from the beginning of its seeded order",
                step,
                data_iterator.stream_count,
            )
        return restored.state

    def close(self) -> None:
        self.wait_for_pinning()
        # Orbax's close would wait for the write that outlived the grace, or raise a failed one again.
        if self._abandoned or self._failed:
            return
        started = time.perf_counter()
        self._wait_for_writes()
        waited = time.perf_counter() - started
        if waited >= 1:
            log.info("waited %.1fs for the last checkpoint to finish writing", waited)
        self._manager.close()


def _with_defaults(model: dict[str, Any]) -> dict[str, Any]:
    """A saved model section with the keys its family gained since, at their defaults: what the
    saved model had (qkv_bias false, rope_scaling null, ...)."""
    fields = registry.get(model["family"]).config.model_fields
    defaults = {
        name: field.get_default(call_default_factory=True)
        for name, field in fields.items()
        if not field.is_required()
    }
    return {**defaults, **model}


def _refuse_other_adapters(saved: dict[str, Any], config: Config, step_dir: Any) -> None:
    """A run resumes with the LoRA adapters it saved: the same rank, targets and alpha."""
    saved_spec = lora.spec_of((saved.get("optim") or {}).get("lora"), config.model)
    spec = lora.spec_of(config.optim.lora, config.model)
    if _shape_of(saved_spec) == _shape_of(spec):  # dropout may change: it is not in the parameters
        return

    def describe(adapters) -> str:
        if adapters is None:
            return "no adapters (optim.lora.rank=0)"
        return (
            f"optim.lora.rank={adapters.rank} alpha={adapters.alpha:g} targets={','.join(adapters.targets)}"
        )

    raise UserError(
        f"checkpoint {step_dir} was saved with {describe(saved_spec)} and this run asks for {describe(spec)}; "
        "use the checkpoint's optim.lora or a new run.dir"
    )


def _shape_of(spec: lora.LoRASpec | None) -> tuple | None:
    return None if spec is None else (spec.rank, spec.alpha, spec.targets)


def _report_changes(saved: dict[str, Any], current: dict[str, Any], schedule_steps: int) -> None:
    """Log the training settings a resumed run changes; warn where the learning rate jumps."""
    changes = [
        f"{section}.{key} {saved[section].get(key)!r} -> {value!r}"
        for section in ("model", "attention", "train", "optim", "data")
        if isinstance(saved.get(section), dict)
        for key, value in current[section].items()
        if key in saved[section] and saved[section][key] != value
    ]
    if changes:
        log.info("resuming with changed settings: %s", ", ".join(changes))
    train, optim = saved.get("train", {}), saved.get("optim", {})
    saved_schedule = optim.get("schedule_steps") or train.get("steps")
    if isinstance(saved_schedule, int) and saved_schedule != schedule_steps:
        log.warning(
            "the learning-rate schedule now spans %d steps instead of the checkpoint's %d, so the "
            "learning rate jumps at this step; set optim.schedule_steps=%d to continue the old one",
            schedule_steps,
            saved_schedule,
            saved_schedule,
        )


def orbax_pins_host_memory(state: Any) -> bool:
    """Whether Orbax's saves go through pinned host memory: its default on GPUs."""
    leaves = jax.tree.leaves(state)
    return (
        jax.default_backend() == "gpu"
        and bool(leaves)
        and any(memory.kind == "pinned_host" for memory in leaves[0].devices().pop().addressable_memories())
    )


def shards_to_save(state: Any) -> list[jax.Array]:
    """This process's shards of every array in `state`, one replica of each."""
    return [
        shard.data
        for leaf in jax.tree.leaves(state)
        for shard in leaf.addressable_shards
        if shard.replica_id == 0
    ]


def pin_host_memory(state: Any) -> threading.Thread:
    """A started thread that copies this process's shards of `state` (one replica of each, as a
    save does) into pinned host memory, waits for the copies and drops them: the pinned pool
    stays with the allocator. The state is only read; it must not be donated until the thread
    is joined."""
    shards = shards_to_save(state)

    def pin() -> None:
        started = time.perf_counter()
        try:
            copies = [
                jax.device_put(shard, SingleDeviceSharding(shard.devices().pop(), memory_kind="pinned_host"))
                for shard in shards
            ]
            jax.block_until_ready(copies)
        except Exception as error:  # the first save then pins what it needs itself
            log.warning("could not pin host memory ahead of the first checkpoint save: %s", error)
            return
        gigabytes = sum(copy.nbytes for copy in copies) / 1e9
        del copies
        log.info(
            "pinned %.2f GB of host memory for checkpoint saves in %.1fs",
            gigabytes,
            time.perf_counter() - started,
        )

    thread = threading.Thread(target=pin, name="jaxlm-pin-host-memory", daemon=True)
    thread.start()
    return thread
