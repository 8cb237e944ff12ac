"""Models from elsewhere: `jaxlm.load(path)` for a Hugging Face directory or a jaxlm run (or one
of its checkpoint steps), ready to run on a mesh; the sources `model.init_from` trains from."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from etils import epath
from flax import nnx

from jaxlm import storage
from jaxlm.config import (
    DEFAULT_FAMILY,
    Config,
    ModelConfig,
    apply_override,
    config_from_dict,
    without_moved_keys,
)
from jaxlm.data.tokenizers import Tokenizer, load_tokenizer
from jaxlm.errors import ConfigError, UserError, cause
from jaxlm.hf import files, read
from jaxlm.model import registry
from jaxlm.model.lora import LoRASpec, merge
from jaxlm.training import lora
from jaxlm.training.setup import ModelSetup, build_model, model_setup, with_shardings

log = logging.getLogger("jaxlm")


@dataclass
class Source:
    """A model to load: a Hugging Face directory, or one checkpoint step of a jaxlm run."""

    path: str  # as the user named it
    model: dict[str, Any]  # the source's model keys
    tokenizer: str | None  # its data.tokenizer: a tokenizer.json path, or "byte"
    eos_token: str | None  # its data.eos_token; a Hugging Face directory's: the one its files name
    eos_ids: tuple[int, ...]  # end-of-sequence ids its files name (empty: the tokenizer's)
    context_length: int  # the longest sequence it is made for
    bos_id: int | None  # the token its prompts start with, if any
    hf: files.HFDirectory | None = None
    checkpoints: epath.Path | None = None  # a jaxlm source's checkpoint directory
    step: int | None = None  # and its step
    lora: dict[str, Any] | None = None  # a jaxlm source's optim.lora, when it trained adapters
    sampling: files.SamplingDefaults = files.UNSET_SAMPLING  # its generation_config.json's

    def read_params(self, setup: ModelSetup) -> Any:
        """The source's parameters on the shardings of `setup`'s base model (without adapters of
        its own), in its param_dtype. A run that trained LoRA adapters gives its merged model:
        each adapted weight W + scale·A·B."""
        if self.hf is not None:
            return read.read_params(self.hf, setup)
        adapters = self.adapters(setup)
        if adapters is None:
            return self._restore(setup.base_abstract_params, setup.base_param_shardings)
        params = self._restore(adapters.abstract_params, adapters.param_shardings)
        return merge(params, setup.family.projections, adapters.lora)

    def adapters(self, setup: ModelSetup) -> ModelSetup | None:
        """The set-up of the source's model with the adapters it trained, on `setup`'s mesh; None
        for a source without adapters."""
        spec: LoRASpec | None = lora.spec_of(self.lora, setup.model_config) if self.lora else None
        if spec is None:
            return None
        return model_setup(setup.model_config, spec, setup.mesh, setup.rules, setup.kernel)

    def read_adapters(self, setup: ModelSetup) -> tuple[Any, ModelSetup]:
        """The parameters with the adapters apart (not merged), and their set-up: for a PEFT
        export. A UserError for a source that trained none."""
        adapters = self.adapters(setup)
        if adapters is None:
            raise UserError(
                f"{self.path} has no LoRA adapters (it was trained with optim.lora.rank=0); export its "
                "whole model without --adapter"
            )
        return self._restore(adapters.abstract_params, adapters.param_shardings), adapters

    def _restore(self, abstract_params: Any, shardings: Any) -> Any:
        """The checkpoint's parameters of these shapes, on these shardings."""
        target = with_shardings(abstract_params, shardings)
        restore_args = jax.tree.map(
            lambda leaf: ocp.ArrayRestoreArgs(
                sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype
            ),
            target,
        )
        state = ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
        )
        try:
            with _manager(self.checkpoints) as manager:
                restored = manager.restore(self.step, args=ocp.args.Composite(state=state))
        except Exception as error:
            raise UserError(
                f"the parameters of checkpoint {self.checkpoints / str(self.step)} cannot be restored ({cause(error)})"
            ) from error
        return restored.state["params"]


def open_source(path: str | Path, step: int | None = None) -> Source:
    """The model at `path`: a Hugging Face directory (config.json), a jaxlm run directory (its
    newest checkpoint, or `step`), or a checkpoint step directory of one."""
    if storage.is_bucket(str(path)):
        storage.check_bucket(str(path), "the model path")
        local = storage.path(str(path))
        if (local / files.CONFIG).is_file():
            raise UserError(
                f"{path} is a Hugging Face directory in a bucket, which jaxlm reads from a disk only; copy it "
                f"(gcloud storage cp -r {path} DIR) and pass DIR"
            )
    else:
        local = Path(path)
    if files.is_hf_directory(local):
        directory = files.open_hf_directory(local)
        tokenizer, special = directory.tokenizer, directory.special_tokens()
        model = read.model_keys(directory)
        return Source(
            str(path),
            model,
            str(tokenizer) if tokenizer else None,
            special.eos_token,
            special.eos_ids,
            model.get("context_length") or 0,  # the family reads it (max_position_embeddings, n_positions)
            special.bos_id,
            hf=directory,
            sampling=directory.sampling_defaults(),
        )
    if (local / "config.yaml").is_file():
        checkpoints = _checkpoint_dir(local)
    elif (local / "state").is_dir() and local.name.isdigit():
        if step is not None and step != int(local.name):
            raise UserError(
                f"{path} is the checkpoint of step {local.name}, not of step {step}; pass the run directory"
            )
        checkpoints, step = _absolute(local.parent), int(local.name)
    else:
        raise UserError(
            f"{path} is neither a Hugging Face model directory (config.json) nor a jaxlm run directory "
            "(config.yaml, checkpoints/) nor one of its checkpoint steps; pass one of those"
        )
    return _checkpoint_source(str(path), checkpoints, step)


def _absolute(path: Path | epath.Path) -> epath.Path:
    return epath.Path(path if storage.is_bucket(path) else Path(path).absolute())


def _checkpoint_dir(run_dir: Path | epath.Path) -> epath.Path:
    """A run directory's checkpoints: checkpoint.dir of its config.yaml, else <run>/checkpoints."""
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise UserError(f"{run_dir / 'config.yaml'} cannot be read ({cause(error)})") from None
    directory = (raw.get("checkpoint") or {}).get("dir") if isinstance(raw, dict) else None
    return epath.Path(directory) if directory else _absolute(run_dir) / "checkpoints"


def _manager(checkpoints: epath.Path) -> ocp.CheckpointManager:
    """A manager that only reads: it is never asked to save, and keeps every step (Orbax's
    read_only option would say so in two warnings each time)."""
    return ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(create=False))


def _checkpoint_source(path: str, checkpoints: epath.Path, step: int | None) -> Source:
    if not checkpoints.is_dir():
        raise UserError(f"{path} has no checkpoints ({checkpoints} does not exist); train it first")
    with _manager(checkpoints) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise UserError(f"{path} has no checkpoints (none complete in {checkpoints}); train it first")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(
                f"{path} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}"
            )
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    data = saved.get("data", {})
    model = {"family": DEFAULT_FAMILY, **without_moved_keys(saved.get("model", {}))}
    adapters = saved.get("optim", {}).get("lora") or {}
    return Source(
        path,
        model,
        data.get("tokenizer", "byte"),
        data.get("eos_token"),
        (),  # the tokenizer's
        model.get("context_length") or data.get("seq_len", 0),
        None,  # jaxlm's documents start with the end-of-document token, not a BOS
        checkpoints=checkpoints,
        step=step,
        lora=adapters if adapters.get("rank") else None,
    )


def latest_step(checkpoints: epath.Path) -> int | None:
    """The newest complete checkpoint step in `checkpoints`, if any."""
    if not checkpoints.is_dir():
        return None
    with _manager(checkpoints) as manager:
        return manager.latest_step()


def source_config(source: Source, overrides: Sequence[str] = ()) -> Config:
    """A config of the source's model and tokenizer (the defaults elsewhere), with `overrides`."""
    if source.tokenizer is None:
        raise UserError(f"{source.path} has no tokenizer.json; jaxlm reads tokenizers in that format")
    raw: dict[str, Any] = {
        "model": dict(source.model),
        "data": {"tokenizer": source.tokenizer, "eos_token": source.eos_token},
    }
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


@dataclass
class Loaded:
    """A model ready to run: its config, its set-up on a mesh, its parameters, its tokenizer."""

    config: Config  # the source's model keys; data.tokenizer its tokenizer
    setup: ModelSetup
    params: Any  # nested dict of jax.Arrays on setup.param_shardings
    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]  # generation stops at any of these
    bos_id: int | None = None  # the token a prompt starts with, where the model has one
    context_length: int | None = None  # the longest sequence it is made for; None: data.seq_len
    # How generate draws tokens where its caller does not say: generation_config.json's settings.
    sampling: files.SamplingDefaults = files.UNSET_SAMPLING

    def model(self) -> nnx.Module:
        """The Flax NNX module with these parameters."""
        return nnx.merge(self.setup.graphdef, self.params)


def load(
    path: str | Path,
    *,
    devices: Sequence[jax.Device] | None = None,
    overrides: Sequence[str] = (),
    step: int | None = None,
) -> Loaded:
    """The model at `path` (a Hugging Face directory, a jaxlm run or checkpoint step directory),
    its parameters sharded over `devices` (default all) by the config's mesh: `overrides` such as
    "mesh.tensor=2" or "model.param_dtype=bfloat16" change it."""
    source = open_source(path, step)
    config = source_config(source, overrides)
    setup = build_model(config, devices)
    tokenizer = load_tokenizer(config.data, hf_prompts=source.hf is not None)
    params = source.read_params(setup)
    eos_ids = source.eos_ids or (tokenizer.eos_id,)
    context_length = source.context_length or None
    return Loaded(config, setup, params, tokenizer, eos_ids, source.bos_id, context_length, source.sampling)


def apply_init_from(config: Config, given: Collection[str] = ()) -> Config:
    """`config` with model.init_from's architecture and tokenizer (`resolve_init_from`)."""
    return resolve_init_from(config, given)[0]


def resolve_init_from(config: Config, given: Collection[str] = ()) -> tuple[Config, Source | None]:
    """`config` with the architecture of model.init_from, and its tokenizer unless data.tokenizer
    is set. The source's keys that shape the parameters are taken as they are; its other family
    keys (RoPE, norms, windows) unless the run sets them (extending a model's context, say); the
    keys every family shares that do not shape parameters (dtypes, remat, ...) are the run's.
    `given`: the dotted keys set on the command line, which must agree with the source's shapes.
    A run with checkpoints of its own takes all that from its newest one, so a restart resumes
    without needing the source again. With it, the source opened (to read its parameters from),
    or None where the run's own checkpoint stood in for it."""
    if not config.model.init_from:
        return config, None
    own_step = latest_step(config.checkpoint_dir)
    if own_step is None:
        source = open_source(config.model.init_from)
    else:
        source = _checkpoint_source(config.run.dir, config.checkpoint_dir, own_step)
    source_model = {"family": DEFAULT_FAMILY, **without_moved_keys(source.model)}
    family = registry.get(source_model["family"])
    set_here = config.model.model_fields_set
    if "family" in set_here and config.model.family != family.name:
        raise ConfigError(
            f"model.family={config.model.family}, and model.init_from={config.model.init_from} is a "
            f"{family.name} model; drop model.family (the family comes from the source)"
        )
    shaping = {"family", *family.shape_keys}
    run_keys = set(ModelConfig.model_fields) - shaping
    architecture = {
        key: value
        for key, value in family.config.model_validate(source_model).model_dump(mode="json").items()
        if key not in run_keys
    }
    current = config.model.model_dump(mode="json")
    for key in sorted(shaping & architecture.keys()):
        if f"model.{key}" in given and current.get(key) != architecture[key]:
            raise ConfigError(
                f"model.{key}={current.get(key)} on the command line disagrees with model.init_from="
                f"{config.model.init_from}, whose {key} is {architecture[key]}; drop it (the parameters' "
                "shapes come from the source)"
            )
    kept = {
        key: current[key]
        for key in (set_here & architecture.keys()) - shaping
        if current[key] != architecture[key]
    }
    if kept and own_step is None:
        log.info(
            "model.init_from=%s: this run sets %s",
            config.model.init_from,
            ", ".join(f"{key} {architecture[key]!r} -> {value!r}" for key, value in sorted(kept.items())),
        )
    architecture.update(kept)
    changed = sorted(key for key, value in architecture.items() if current.get(key) != value)
    if changed:
        log.info(
            "model.init_from=%s sets %s",
            config.model.init_from,
            ", ".join(f"{key} {current.get(key)!r} -> {architecture[key]!r}" for key in changed),
        )
    raw = config.to_dict()
    raw["model"] = {**{key: current[key] for key in run_keys if key in current}, **architecture}
    if "tokenizer" not in config.data.model_fields_set:
        if source.tokenizer is None:
            raise ConfigError(
                f"model.init_from={config.model.init_from} has no tokenizer.json; set data.tokenizer to the model's tokenizer"
            )
        raw["data"].update(tokenizer=source.tokenizer, eos_token=config.data.eos_token or source.eos_token)
    return config_from_dict(raw), source if own_step is None else None
