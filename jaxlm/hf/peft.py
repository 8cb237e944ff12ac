"""LoRA adapters in PEFT's format, out and in: `adapter_config.json` and
`adapter_model.safetensors`, which PEFT's `PeftModel.from_pretrained` loads onto the base model.

PEFT adapts a Linear y = x·Wᵀ (W [out, in]) with lora_A.weight [r, in] and lora_B.weight [out, r]:
y += scale · x·Aᵀ·Bᵀ, scale = lora_alpha / r. jaxlm's A [*in, r] and B [r, *out] of one layer are
those matrices transposed, once their input and output axes are flattened in the order of the
Hugging Face tensor (checked against the family's table). Tensor names follow the table too:
`base_model.model.<module>.lora_A.weight` for the module of `<module>.weight`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.errors import UserError
from jaxlm.hf.files import read_json
from jaxlm.hf.read import view_groups
from jaxlm.hf.write import gatherer, staging_directory
from jaxlm.loading import open_source, source_config
from jaxlm.model.lora import LoRASpec, adapter_path, lookup
from jaxlm.model.registry import HFTensor, Projection
from jaxlm.setup import ModelSetup, build_model

log = logging.getLogger("jaxlm")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # where PeftModel puts the transformers model


def _linear(setup: ModelSetup, projection: Projection) -> HFTensor:
    """The Hugging Face Linear weight of `projection`; a UserError if the family's table does not
    lay it out as [outputs, inputs] flattened in the order of jaxlm's axes."""
    table = {tensor.param: tensor for tensor in setup.family.hf.tensors(setup.model_config)}
    tensor = table[projection.param]
    outputs, inputs = view_groups(tensor.hf_shape, tensor.view) if len(tensor.hf_shape) == 2 else ([], [])
    axes = list(tensor.order)
    if axes[: projection.inputs] != inputs or axes[projection.inputs :] != outputs:
        raise UserError(
            f"{tensor.name} is not a Linear weight [outputs, inputs] of {projection.param}; "
            "its adapter has no PEFT form"
        )
    return tensor


def _module(tensor: HFTensor) -> str:
    """'model.layers.{layer}.self_attn.q_proj' for 'model.layers.{layer}.self_attn.q_proj.weight'."""
    return tensor.name.removesuffix(".weight")


def _targets(setup: ModelSetup, spec: LoRASpec) -> list[tuple[Projection, HFTensor]]:
    return [
        (projection, _linear(setup, projection))
        for projection in setup.family.projections
        if projection.name in spec.targets
    ]


def export_adapter(
    source_path: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    devices=None,
) -> None:
    """Write the LoRA adapters of the jaxlm run at `source_path` to `out_dir` in PEFT's format."""
    out = Path(out_dir)
    if str(out_dir).startswith("gs://") or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UserError(
            f"{out} must be a new (or empty) local directory; choose another OUT_DIR (nothing was written)"
        )
    source = open_source(source_path, step)
    if source.hf is not None:
        raise UserError(f"{source_path} is a Hugging Face model, not a jaxlm run that trained LoRA adapters")
    config = source_config(source)
    setup = build_model(config, devices)
    params, adapters = source.read_adapters(setup)
    spec = adapters.lora
    targets = _targets(setup, spec)  # checked before anything is written
    dtype = np.dtype(dtype or config.model.param_dtype)
    gather = gatherer(adapters)
    tensors: dict[str, np.ndarray] = {}
    for projection, tensor in targets:
        factors = lookup(params, adapter_path(projection))
        for layer in range(setup.model_config.num_layers) if projection.stacked else [None]:
            a, b = gather(factors["a"], layer), gather(factors["b"], layer)
            if a is None:
                continue  # not process 0
            module = PREFIX + _module(tensor).format(layer=layer)
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(
                a.reshape(-1, spec.rank).T.astype(dtype)
            )
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(
                b.reshape(spec.rank, -1).T.astype(dtype)
            )
    if jax.process_index() != 0:
        return
    staging = staging_directory(out)
    try:
        save_file(tensors, staging / WEIGHTS, metadata={"format": "pt"})
        adapter_config = peft_config(spec, targets, source.model.get("init_from"))
        (staging / CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info(
        "exported the LoRA adapters of %s to %s (PEFT format, %d tensors)", source_path, out, len(tensors)
    )


def peft_config(
    spec: LoRASpec, targets: list[tuple[Projection, HFTensor]], base: str | None
) -> dict[str, Any]:
    """adapter_config.json: PEFT's LoraConfig of these adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(_module(tensor).rsplit(".", 1)[-1] for _, tensor in targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def read_adapter(directory: str | Path, setup: ModelSetup) -> Any:
    """The adapters of a PEFT LoRA directory, on the shardings of `setup` (a set-up with the same
    rank, alpha and targets): a nested dict of the adapter parameters, as `split_adapters` gives."""
    directory = Path(directory)
    config = read_json(directory / CONFIG)
    spec = setup.lora
    targets = _targets(setup, spec)
    _check_config(directory, config, spec, targets)
    adapters_abstract = {}
    with safe_open(directory / WEIGHTS, framework="numpy") as weights:
        names = set(weights.keys())
        for projection, tensor in targets:
            layers = range(setup.model_config.num_layers) if projection.stacked else [None]
            a, b = [], []
            for layer in layers:
                module = PREFIX + _module(tensor).format(layer=layer)
                a.append(_tensor(weights, names, f"{module}.lora_A.weight", directory).T)  # [in, r]
                b.append(_tensor(weights, names, f"{module}.lora_B.weight", directory).T)  # [r, out]
            owner = adapters_abstract
            for key in adapter_path(projection):
                owner = owner.setdefault(key, {})
            owner["a"], owner["b"] = np.stack(a), np.stack(b)
    return _placed(adapters_abstract, setup, directory)


def _tensor(weights, names: set[str], name: str, directory: Path) -> np.ndarray:
    if name not in names:
        raise UserError(f"{directory / WEIGHTS} has no tensor {name}; is it an adapter of this base model?")
    return weights.get_tensor(name).astype(np.float32)


def _placed(adapters: Any, setup: ModelSetup, directory: Path) -> Any:
    """The read adapters reshaped to jaxlm's [layers, *in, rank] / [layers, rank, *out] and placed."""
    abstract = {path: leaf for path, leaf in _leaves(setup.abstract_params) if "lora" in path}
    shardings = dict(_leaves(setup.param_shardings))

    def place(path, array):
        expected = abstract[path]
        if array.size != math.prod(expected.shape):
            raise UserError(
                f"{directory / WEIGHTS}: the adapter of {'.'.join(path)} has {array.size} values, "
                f"expected {math.prod(expected.shape)}; is it an adapter of this base model?"
            )
        return jax.device_put(jnp.asarray(array.reshape(expected.shape), expected.dtype), shardings[path])

    return jax.tree_util.tree_map_with_path(lambda path, x: place(_keys(path), x), adapters)


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    return [(_keys(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _keys(path) -> tuple[str, ...]:
    return tuple(str(key.key) for key in path)


def _check_config(directory: Path, config: dict[str, Any], spec: LoRASpec, targets) -> None:
    """The PEFT config describes the adapters optim.lora asks for, in a form jaxlm computes."""
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{directory / CONFIG} has peft_type {config.get('peft_type')!r}; jaxlm reads LORA adapters"
        )
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(key):
            raise UserError(f"{directory / CONFIG} has {key}=true, which jaxlm's LoRA does not compute")
    if config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(
            f"{directory / CONFIG} has adapter biases or per-module ranks/alphas; jaxlm reads bias none, one r and alpha"
        )
    modules = config.get("target_modules") or []
    wanted = sorted(_module(tensor).rsplit(".", 1)[-1] for _, tensor in targets)
    found = {
        "r": (config.get("r"), spec.rank),
        "lora_alpha": (config.get("lora_alpha"), spec.alpha),
        "target_modules": (sorted(modules) if isinstance(modules, list) else modules, wanted),
    }
    for key, (theirs, ours) in found.items():
        if theirs != ours:
            raise UserError(
                f"{directory / CONFIG} has {key}={theirs}, and optim.lora asks for {ours}; set optim.lora "
                "rank, alpha and targets to the adapter's"
            )
