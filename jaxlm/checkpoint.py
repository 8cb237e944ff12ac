"""Orbax checkpoints of a run: train state, every process's data iterator, and the config.

Saves are asynchronous (training goes on while arrays are written) and atomic: Orbax writes a
step to a temporary directory and renames it when complete, so `latest_step` never returns a
half-written step. Restores place every array directly onto the shardings of the current mesh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.config import Config
from jaxlm.errors import UserError

log = logging.getLogger("jaxlm")


class Checkpointer:
    def __init__(self, config: Config):
        self.directory = config.checkpoint_dir.absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=config.checkpoint.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: Config) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=True,
        )

    def saved_config(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config

    def restore(self, step: int, abstract_state: Any, data_iterator: Any, config: Config) -> Any:
        """The train state at `step`, placed on the shardings in `abstract_state`; the data
        iterator is restored in place."""
        saved_model = self.saved_config(step).get("model")
        if saved_model != config.to_dict()["model"]:
            changed = sorted(k for k in saved_model if saved_model[k] != config.to_dict()["model"].get(k))
            raise UserError(
                f"checkpoint {self.directory / str(step)} was saved with a different model "
                f"(model.{', model.'.join(changed)} differ); use its model config or a new run.dir"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return restored.state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target sharding, for a resharding restore."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )


def has_checkpoints(directory: Path) -> bool:
    return directory.is_dir() and any(child.name.isdigit() for child in directory.iterdir())
