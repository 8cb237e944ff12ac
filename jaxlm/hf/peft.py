"""LoRA adapters in PEFT's format, out and in: `adapter_config.json` and
`adapter_model.safetensors`, which PEFT's `PeftModel.from_pretrained` loads onto the base model.

PEFT adapts a Linear y = x·Wᵀ (W [out, in]) with lora_A.weight [r, in] and lora_B.weight [out, r]:
y += scale · x·Aᵀ·Bᵀ, scale = lora_alpha / r. jaxlm's A [*in, r] and B [r, *out] of one layer are
those matrices transposed, once their input and output axes are flattened in the order of the
Hugging Face tensor (checked against the family's table). Tensor names follow the table too:
`base_model.model.<module>.lora_A.weight` for the module of `<module>.weight`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxlm.errors import UserError
from jaxlm.hf.files import read_json
from jaxlm.hf.read import view_groups
from jaxlm.model.lora import LoRASpec, adapter_path
from jaxlm.model.registry import HFTensor, Projection

if TYPE_CHECKING:
    from jaxlm.training.setup import ModelSetup

log = logging.getLogger("jaxlm")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # where PeftModel puts the transformers model


class Target(NamedTuple):
    """A projection LoRA adapts and the Hugging Face weight it is: a Linear [outputs, inputs], or
    a Conv1D [inputs, outputs] (GPT-2's; PEFT's fan_in_fan_out). PEFT's lora_A [r, inputs] and
    lora_B [outputs, r] are the same for both."""

    projection: Projection
    tensor: HFTensor
    conv1d: bool


def _target(setup: ModelSetup, projection: Projection) -> Target:
    """The Hugging Face weight of `projection`; a UserError if the family's table does not lay it
    out as [outputs, inputs] or [inputs, outputs], each flattened in the order of jaxlm's axes."""
    table = {tensor.param: tensor for tensor in setup.family.hf.tensors(setup.model_config)}
    tensor = table[projection.param]
    first, second = view_groups(tensor.hf_shape, tensor.view) if len(tensor.hf_shape) == 2 else ([], [])
    axes = list(tensor.order)
    inputs, outputs = axes[: projection.inputs], axes[projection.inputs :]
    if (inputs, outputs) == (second, first):
        return Target(projection, tensor, conv1d=False)
    if (inputs, outputs) == (first, second):
        return Target(projection, tensor, conv1d=True)
    raise UserError(
        f"{tensor.name} is neither a Linear weight [outputs, inputs] nor a Conv1D [inputs, outputs] of "
        f"{projection.param}; its adapter has no PEFT form"
    )


def module_name(tensor: HFTensor) -> str:
    """'model.layers.{layer}.self_attn.q_proj' for 'model.layers.{layer}.self_attn.q_proj.weight'."""
    return tensor.name.removesuffix(".weight")


def lora_targets(setup: ModelSetup, spec: LoRASpec) -> list[Target]:
    return [
        _target(setup, projection)
        for projection in setup.family.projections
        if projection.name in spec.targets
    ]


def _modules(setup: ModelSetup) -> list[str]:
    """The module names of every projection of the family (what PEFT's target_modules select from)."""
    table = {tensor.param: tensor for tensor in setup.family.hf.tensors(setup.model_config)}
    return [module_name(table[projection.param]) for projection in setup.family.projections]


def _selects(target: str, module: str) -> bool:
    """PEFT's matching of one target_modules entry: the module's name, or its dotted suffix."""
    return module == target or module.endswith("." + target)


def target_modules(setup: ModelSetup, targets: list[Target]) -> list[str]:
    """PEFT's target_modules for `targets`: each module's last name, or as many of its last names
    as tell it from the family's other projections (GPT-2's attn.c_proj and mlp.c_proj)."""
    others = _modules(setup)
    names = []
    for target in targets:
        parts = module_name(target.tensor).split(".")
        for count in range(1, len(parts) + 1):
            suffix = ".".join(parts[-count:])
            if [module for module in others if _selects(suffix, module)] == [module_name(target.tensor)]:
                break
        names.append(suffix)
    return sorted(names)


def _selected(setup: ModelSetup, config_targets: Any) -> list[str]:
    """The family's projection modules that a PEFT config's target_modules (a list of names, or a
    regular expression over module names) adapts."""
    if isinstance(config_targets, str):
        return sorted(
            module for module in _modules(setup) if re.fullmatch(config_targets, module.format(layer=0))
        )
    return sorted(
        module for module in _modules(setup) if any(_selects(t, module) for t in config_targets or [])
    )


def peft_config(setup: ModelSetup, spec: LoRASpec, targets: list[Target], base: str | None) -> dict[str, Any]:
    """adapter_config.json: PEFT's LoraConfig of these adapters."""
    if len({target.conv1d for target in targets}) > 1:
        raise UserError(
            f"optim.lora.targets={list(spec.targets)} adapt both Linear and Conv1D weights, and PEFT's "
            "adapter_config.json has one fan_in_fan_out; export adapters of one kind"
        )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_modules(setup, targets),
        "bias": "none",
        "fan_in_fan_out": bool(targets) and targets[0].conv1d,
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
    targets = lora_targets(setup, spec)
    _check_config(directory, config, setup, targets)
    adapters_abstract = {}
    with safe_open(directory / WEIGHTS, framework="numpy") as weights:
        names = set(weights.keys())
        for projection, tensor, _ in targets:
            layers = range(setup.model_config.num_layers) if projection.stacked else [None]
            a, b = [], []
            for layer in layers:
                module = PREFIX + module_name(tensor).format(layer=layer)
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


def _check_config(directory: Path, config: dict[str, Any], setup: ModelSetup, targets: list[Target]) -> None:
    """The PEFT config describes the adapters optim.lora asks for, in a form jaxlm computes
    (fan_in_fan_out aside: it says how the base weight is stored, which PEFT sets per module)."""
    spec = setup.lora
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{directory / CONFIG} has peft_type {config.get('peft_type')!r}; jaxlm reads LORA adapters"
        )
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise UserError(f"{directory / CONFIG} has {key}=true, which jaxlm's LoRA does not compute")
    if config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(
            f"{directory / CONFIG} has adapter biases or per-module ranks/alphas; jaxlm reads bias none, one r and alpha"
        )
    modules = config.get("target_modules") or []
    found = {
        "r": (config.get("r"), spec.rank, config.get("r") == spec.rank),
        "lora_alpha": (config.get("lora_alpha"), spec.alpha, config.get("lora_alpha") == spec.alpha),
        "target_modules": (
            sorted(modules) if isinstance(modules, list) else modules,
            target_modules(setup, targets),
            _selected(setup, modules) == sorted(module_name(target.tensor) for target in targets),
        ),
    }
    for key, (theirs, ours, same) in found.items():
        if not same:
            raise UserError(
                f"{directory / CONFIG} has {key}={theirs}, and optim.lora asks for {ours}; set optim.lora "
                "rank, alpha and targets to the adapter's"
            )
