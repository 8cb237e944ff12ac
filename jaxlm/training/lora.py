"""optim.lora checked against the model family: which projections get adapters, at what rank.

The adapters themselves (their module, merging them into the weights) are `jaxlm.model.lora`;
this module turns the config into their `LoRASpec` and refuses, in one line before anything
compiles, what the family cannot adapt.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxlm.config import LoRAConfig, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.model import registry
from jaxlm.model.lora import LoRASpec, lookup

# Random streams derived from train.seed besides the parameters' own: the adapters' A, and the
# adapters' dropout (folded with the step, so a resumed run draws the masks it would have drawn).
INIT_STREAM, DROPOUT_STREAM = 1, 2


def spec_of(lora: LoRAConfig | dict[str, Any] | None, model: ModelConfig) -> LoRASpec | None:
    """The adapters optim.lora asks of `model`'s family; None when optim.lora.rank is 0."""
    if isinstance(lora, dict):
        lora = LoRAConfig.model_validate(lora)
    if lora is None or not lora.rank:
        return None
    family = registry.family_of(model)
    names = [projection.name for projection in family.projections]
    if not names:
        raise ConfigError(
            f"optim.lora.rank={lora.rank}: model.family={family.name} has no projections LoRA can adapt; "
            "set optim.lora.rank=0"
        )
    targets = tuple(dict.fromkeys(lora.targets if lora.targets is not None else family.lora_targets))
    if not targets:
        raise ConfigError(f"optim.lora.targets is empty; name some of {', '.join(names)}")
    unknown = [target for target in targets if target not in names]
    if unknown:
        raise ConfigError(
            f"optim.lora.targets names {', '.join(unknown)}, which the {family.name} family does not have; "
            f"use some of {', '.join(names)}"
        )
    return LoRASpec(lora.rank, lora.alpha, lora.dropout, targets)


def check_rank(spec: LoRASpec, model: ModelConfig, abstract_params: Any) -> None:
    """Refuse a rank above the smaller side of an adapted projection: its adapter would hold more
    than the weight it adapts, and no longer be low-rank."""
    for projection in registry.family_of(model).projections:
        if projection.name not in spec.targets:
            continue
        shape = lookup(abstract_params, projection.param).shape[1 if projection.stacked else 0 :]
        inputs, outputs = math.prod(shape[: projection.inputs]), math.prod(shape[projection.inputs :])
        if spec.rank > min(inputs, outputs):
            raise ConfigError(
                f"optim.lora.rank={spec.rank} is larger than projection {projection.name} "
                f"({inputs} inputs × {outputs} outputs); use a rank of at most {min(inputs, outputs)}"
            )


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The adapters' dropout key of a step."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)
