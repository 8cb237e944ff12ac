"""A jaxlm run directory's newest parameters and tokenizer, for generation: the run-directory half
of `jaxlm.load`, kept apart until jaxlm/loading.py (which also reads Hugging Face directories)
takes it over."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm.config import Config, load_config
from jaxlm.data.tokenizers import Tokenizer, load_tokenizer
from jaxlm.errors import UserError
from jaxlm.setup import ModelSetup, build_train, with_shardings


@dataclass
class Loaded:
    """A model ready to use: config, set-up on a mesh, parameters on its shardings, tokenizer."""

    config: Config
    setup: ModelSetup
    params: Any
    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]

    def model(self) -> nnx.Module:
        return nnx.merge(self.setup.graphdef, self.params)


def load_run(path: str | Path, devices: Sequence[jax.Device] | None = None) -> Loaded:
    """The newest checkpoint of the run in `path`, its parameters sharded over `devices` (default:
    all) by FSDP, whatever mesh trained it."""
    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a jaxlm run directory (no config.yaml); name the run.dir of a run")
    devices = list(devices if devices is not None else jax.devices())
    # The parameters only: any mesh will do, and one FSDP axis over these devices always does.
    mesh = ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", "mesh.dcn_data=1", "mesh.dcn_fsdp=1"]
    batch = [f"train.global_batch_size={len(devices)}", "train.micro_batches=1", "mesh.dcn_tensor=1"]
    config = load_config(run_dir / "config.yaml", [*mesh, *batch, f"run.dir={run_dir}"])
    manager = ocp.CheckpointManager(config.checkpoint_dir)
    step = manager.latest_step()
    if step is None:
        raise UserError(
            f"{run_dir} has no checkpoints in {config.checkpoint_dir}; train it until it saves one "
            "(checkpoint.every, or the end of the run)"
        )
    setup = build_train(config, devices)
    target = with_shardings(setup.abstract_state, setup.state_shardings)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    manager.close()
    tokenizer = load_tokenizer(config.data)
    return Loaded(config, setup.model, restored.state.params, tokenizer, (tokenizer.eos_id,))
