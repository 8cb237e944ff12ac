"""Model families: `model.family` names one, and the family answers everything the rest of jaxlm
asks about its models. Nothing outside `jaxlm/model/` knows a parameter name or a FLOP formula.

A family's module is a Flax NNX module built by `build(config, rngs)` whose parameters carry
logical axis names (`nnx.Param(..., out_sharding=("embed", "mlp"))`) and which provides:

    model(tokens, positions, segment_ids, cache=None, *, return_hidden=False, dropout_key=None)
        -> (out, cache)
        tokens, positions, segment_ids: [batch, length] int32. `out` is the logits
        [batch, length, vocab], or with return_hidden the final normed hidden states
        [batch, length, embed] that `output_projection()` turns into logits. Without a cache the
        tokens are whole packed rows (attention is causal within each segment) and the returned
        cache is None; with one, they continue the cache's sequences and the cache comes back
        with them appended (prefill, then one token at a time for generation). dropout_key: the
        LoRA adapters' dropout, given only in training to a model built with adapters.
        order: given only under context parallelism (to families with `kv_per_token`), rows
        laid out by `parallel.load_balanced_order`: each position's original position, in which
        attention is causal.
    model.output_projection() -> [embed, vocab] in the compute dtype
    model.init_cache(batch, max_length) -> an empty cache for `max_length` tokens per row: a
        pytree whose `logical_axes()` is the same tree with each array's logical axes, so that
        generation keeps it sharded like the model (jaxlm/generation.py). Segment id 0 marks
        padding: generation left-pads prompts of different lengths with it, and no token of
        segment 1 attends to a padded slot.

See docs/architecture.md#model-families for how to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, UserError


@dataclass(frozen=True)
class HFTensor:
    """Where one parameter lives in a Hugging Face checkpoint. The tensor `name` ("{layer}" in it
    for each layer of a parameter stacked on a leading `layers` axis), of shape `hf_shape`,
    reshaped to `view` and transposed by `order`, is the parameter (one layer of it)."""

    param: str  # path of the parameter in the module: "blocks.attention.wq"
    name: str  # "model.layers.{layer}.self_attn.q_proj.weight"
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]
    order: tuple[int, ...]
    stacked: bool  # the parameter has a leading `layers` axis, one Hugging Face tensor per layer


@dataclass(frozen=True)
class HuggingFace:
    """A family's conversion to and from Hugging Face transformers (torchtitan's state-dict
    adapter, in the shape of jaxlm's config)."""

    architectures: tuple[str, ...]  # the `architectures` of config.json the family reads
    # config.json → the family's model keys; a UserError (one line) for what it cannot represent.
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    # model config → config.json (with its `architectures`), given the context length to write.
    config_to_hf: Callable[[ModelConfig, int], dict[str, Any]]
    tensors: Callable[[ModelConfig], list[HFTensor]]


@dataclass(frozen=True)
class Projection:
    """A weight that LoRA can adapt: y = x·W contracts W's first `inputs` axes (after its leading
    `layers` axis, if stacked) with x; the rest are y's. Its name (the last part of `param`) is
    what optim.lora.targets lists."""

    param: str  # path of the weight in the module: "blocks.attention.wq"
    inputs: int
    stacked: bool = True

    @property
    def name(self) -> str:
        return self.param.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config: type[ModelConfig]  # the family's model.* keys
    # (config, rngs) → the module; with a third argument, a `jaxlm.model.lora.LoRASpec`, the module
    # with adapters on the targeted projections (families with `projections` only).
    build: Callable[..., nnx.Module]
    # Training FLOPs per token of a row of `seq_len` tokens (forward and backward), as MFU and
    # `jaxlm plan` count them; a family with `projections` also takes `frozen_weights=True`:
    # the count when no weight gets a gradient (LoRA).
    flops_per_token: Callable[..., float]
    # Whether AdamW decays the parameter at this path ("blocks.mlp.w_up"), given
    # optim.decay_embeddings.
    decays: Callable[[str, bool], bool]
    # Importing and exporting Hugging Face checkpoints; None: the family has no HF counterpart.
    hf: HuggingFace | None = None
    # The weights LoRA can adapt (optim.lora.targets names them), and those optim.lora adapts
    # when it names none. Empty: the family has no adapters.
    projections: tuple[Projection, ...] = ()
    lora_targets: tuple[str, ...] = ()
    # Model keys a run may set differently from model.init_from's (in its config or on the command
    # line): how positions are encoded, which is what extending a model's context changes.
    context_keys: tuple[str, ...] = ()
    # Key and value elements per token and layer that attention gathers under context parallelism
    # (`jaxlm plan` counts them in its ICI time). A family with it takes `order` (see above); one
    # without it (None) refuses mesh.context > 1.
    kv_per_token: Callable[[ModelConfig], int] | None = None
    # The intermediate tensors its forward names with jax.ad_checkpoint.checkpoint_name, which
    # remat policies save or offload by name (`jaxlm.model.remat` says which names the presets use:
    # a family names those it has, and may add its own for model.remat=custom).
    activations: tuple[str, ...] = ()


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


def family_of_architecture(architecture: str) -> ModelFamily:
    """The family that reads Hugging Face checkpoints of `architecture` (config.json's)."""
    for family in _FAMILIES.values():
        if family.hf and architecture in family.hf.architectures:
            return family
    supported = sorted(name for family in _FAMILIES.values() if family.hf for name in family.hf.architectures)
    raise UserError(f"architecture {architecture} is not supported; jaxlm reads {', '.join(supported)}")


def family_of(config: ModelConfig) -> ModelFamily:
    return get(config.family)


def abstract_model(config: ModelConfig, lora=None) -> nnx.Module:
    """The model as shapes only (with the adapters of `lora`, a LoRASpec, if given): nothing is
    allocated."""
    return nnx.eval_shape(lambda: build(config, nnx.Rngs(0), lora))


def build(config: ModelConfig, rngs: nnx.Rngs, lora=None) -> nnx.Module:
    """The family's module, with the adapters of `lora` (a LoRASpec) if given."""
    family = family_of(config)
    return family.build(config, rngs, lora) if lora else family.build(config, rngs)
