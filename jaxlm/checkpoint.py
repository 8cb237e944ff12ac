"""Orbax checkpoints of a run: train state, every process's data iterator, and the config.

Saves are asynchronous (training goes on while arrays are written) and atomic: Orbax writes a
step to a temporary directory and renames it when complete, so `latest_step` never returns a
half-written step (those are reported and skipped). Restores place every array directly onto
the shardings of the current mesh, whatever mesh or process count saved it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm.config import Config
from jaxlm.errors import UserError

log = logging.getLogger("jaxlm")

# Model keys that change how the step runs, not the parameters: a run may resume with new values.
HOW_TO_RUN_MODEL_KEYS = frozenset({"dtype", "remat", "scan_layers", "attention", "max_documents"})


class DataShardsHandler(ocp.CheckpointHandler):
    """Saves each data shard's Grain iterator state as `shard_<i>-of-<n>.json`, written by the
    process that reads that shard, so any process layout with the same shards can restore it."""

    def save(self, directory: epath.Path, args: DataShardsSave) -> None:
        shard_count = args.item.shard_count
        for index, state in args.item.shard_states().items():
            (directory / f"shard_{index}-of-{shard_count}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: DataShardsRestore) -> bool:
        """Restore the iterators in place; False when the checkpoint has another shard count."""
        item = args.item
        files = {
            int(m.group(1)): (m.group(2), path)
            for path in directory.iterdir()
            if (m := _SHARD_FILE.match(path.name))
        }
        saved_counts = {int(count) for count, _ in files.values()}
        if saved_counts != {item.shard_count}:
            return False
        item.restore_shard_states(
            {index: json.loads(files[index][1].read_text()) for index in item.shard_indices}
        )
        return True


_SHARD_FILE = re.compile(r"shard_(\d+)-of-(\d+)\.json")


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    def __init__(self, config: Config):
        self.directory = config.checkpoint_dir
        if jax.process_index() == 0:
            for incomplete in incomplete_steps(self.directory):
                log.warning("ignoring incomplete checkpoint %s (a save that was interrupted)", incomplete)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=config.checkpoint.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: Config) -> None:
        started = time.perf_counter()
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=DataShardsSave(data_iterator),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=True,
        )
        log.info(
            "checkpoint of step %d: training waited %.2fs for it%s",
            step,
            time.perf_counter() - started,
            " (written in the background)" if config.checkpoint.async_save else "",
        )

    def saved_config(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config

    def restore(self, step: int, abstract_state: Any, data_iterator: Any, config: Config) -> Any:
        """The train state at `step`, placed on the shardings in `abstract_state`; the data
        iterator is restored in place."""
        saved_model = self.saved_config(step).get("model", {})
        model = config.to_dict()["model"]
        changed = sorted(
            key
            for key in saved_model.keys() | model.keys()
            if key not in HOW_TO_RUN_MODEL_KEYS and saved_model.get(key) != model.get(key)
        )
        if changed:
            raise UserError(
                f"checkpoint {self.directory / str(step)} was saved with a different model "
                f"(model.{', model.'.join(changed)} differ); use its model config or a new run.dir"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=DataShardsRestore(data_iterator),
            ),
        )
        if not restored.data:
            log.warning(
                "checkpoint step %d holds the data position for another number of data shards than this "
                "run's %d (data.shards changed, or it defaults to one per process and the process count "
                "changed): the model and optimizer state are restored, the data starts again from the "
                "beginning of its seeded order. Keep data.shards fixed to resume the data position exactly.",
                step,
                data_iterator.shard_count,
            )
        return restored.state

    def close(self) -> None:
        started = time.perf_counter()
        self._manager.wait_until_finished()
        waited = time.perf_counter() - started
        if waited >= 1:
            log.info("waited %.1fs for the last checkpoint to finish writing", waited)
        self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target sharding, for a resharding restore."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )


def incomplete_steps(directory: epath.Path) -> list[epath.Path]:
    """Step directories Orbax never finalised (it renames them from a temporary name when done)."""
    if not directory.is_dir():
        return []
    return sorted(
        child for child in directory.iterdir() if child.is_dir() and ".orbax-checkpoint-tmp" in child.name
    )
