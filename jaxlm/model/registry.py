"""Model families: `model.family` names one, and the family answers everything the rest of jaxlm
asks about its models. Nothing outside `jaxlm/model/` knows a parameter name or a FLOP formula.

A family's module is a Flax NNX module built by `build(config, rngs)` whose parameters carry
logical axis names (`nnx.Param(..., out_sharding=("embed", "mlp"))`) and which provides:

    model(tokens, positions, segment_ids, cache=None, *, return_hidden=False) -> (out, cache)
        tokens, positions, segment_ids: [batch, length] int32. `out` is the logits
        [batch, length, vocab], or with return_hidden the final normed hidden states
        [batch, length, embed] that `output_projection()` turns into logits. Without a cache the
        tokens are whole packed rows (attention is causal within each segment) and the returned
        cache is None; with one, they continue the cache's sequences and the cache comes back
        with them appended (prefill, then one token at a time for generation).
    model.output_projection() -> [embed, vocab] in the compute dtype
    model.init_cache(batch, max_length) -> an empty cache for `max_length` tokens per row

See docs/architecture.md#model-families for how to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config: type[ModelConfig]  # the family's model.* keys
    build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
    # Training FLOPs per token of a row of `seq_len` tokens (forward and backward), as MFU and
    # `jaxlm plan` count them.
    flops_per_token: Callable[[ModelConfig, int], float]
    # Whether AdamW decays the parameter at this path ("blocks.mlp.w_up"), given
    # optim.decay_embeddings.
    decays: Callable[[str, bool], bool]
    # Parameter path → the Hugging Face tensor name of the same weights ("{layer}" in the names
    # of stacked block parameters), for importing and exporting checkpoints.
    hf_names: Callable[[ModelConfig], dict[str, str]]


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> None:
    """Make `family` available as `model.family=<family.name>`."""
    _FAMILIES[family.name] = family


def get(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise ConfigError(
            f"model.family={name} is not a model family; use one of {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[name]


def family_of(config: ModelConfig) -> ModelFamily:
    return get(config.family)


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model as shapes only: nothing is allocated."""
    return nnx.eval_shape(lambda: family_of(config).build(config, nnx.Rngs(0)))
