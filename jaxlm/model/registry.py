"""Model families: `model.family` names one, and the family answers everything the rest of jaxlm
asks about its models. Nothing outside `jaxlm/model/` knows a parameter name, a config key of a
family or a FLOP formula: it asks the family's `ModelFamily` entry here.

A family's module is a Flax NNX module built by `build(config, rngs, kernel, lora)` whose
parameters carry logical axis names (`nnx.Param(..., out_sharding=("embed", "mlp"))`) and which
provides:

    model(tokens, positions, segment_ids, cache=None, *, return_hidden=False, dropout_key=None,
          order=None) -> ModelOutput
        tokens, positions, segment_ids: [batch, length] int32. The output holds the logits
        [batch, length, vocab], or with return_hidden the final normed hidden states [batch,
        length, embed] that `output_head()` turns into logits; the cache; and the auxiliary
        losses the train step adds to the loss (empty for dense families). Without a cache the
        tokens are whole packed rows (attention is causal within each segment) and the returned
        cache is None; with one, they continue the cache's sequences and the cache comes back
        with them appended (prefill, then one token at a time for generation). dropout_key: the
        LoRA adapters' dropout, given only in training to a model built with adapters.
        order: given only under context parallelism (to families whose `traffic` gathers keys
        and values), rows laid out by `parallel.load_balanced_order`: each position's original
        position, in which attention is causal.
    model.output_head() -> OutputHead: the [embed, vocab] projection in the compute dtype and
        its logit soft-capping, if any
    model.init_cache(batch, max_length) -> an empty cache for `max_length` tokens per row: a
        pytree whose `logical_axes()` is the same tree with each array's logical axes, so that
        generation keeps it sharded like the model (jaxlm/inference/generation.py). Segment id 0 marks
        padding: generation left-pads prompts of different lengths with it, and no token of
        segment 1 attends to a padded slot.

See docs/architecture.md#model-families for how to add one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import config as config_module
from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, UserError
from jaxlm.model import remat, splash
from jaxlm.model.layers import XLA_KERNEL, AttentionKernel


@flax.struct.dataclass
class ModelOutput:
    """What a family's forward returns."""

    logits: jax.Array | None = None  # [batch, length, vocab]; None when hidden states were asked for
    hidden: jax.Array | None = None  # [batch, length, embed], final normed (return_hidden)
    cache: Any = None  # the cache with these tokens appended; None without one
    # Name → scalar loss the train step adds to the loss and logs by name (a mixture of experts'
    # load balancing, say); empty for dense families.
    aux_losses: dict[str, jax.Array] = field(default_factory=dict)
    # Name → scalar the train step logs as it is, not trained on (a mixture of experts' load).
    metrics: dict[str, jax.Array] = field(default_factory=dict)


@flax.struct.dataclass
class OutputHead:
    """Hidden states → logits: `hidden @ weight`, then `softcap · tanh(logits / softcap)` where the
    family caps its final logits (Gemma 2)."""

    weight: jax.Array  # [embed, vocab] in the compute dtype
    softcap: float | None = flax.struct.field(pytree_node=False, default=None)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., embed] → logits [..., vocab], in the compute dtype."""
        return self.cap(jnp.einsum("...e,ev->...v", hidden, self.weight))

    def cap(self, logits: jax.Array) -> jax.Array:
        if self.softcap is None:
            return logits
        return (self.softcap * jnp.tanh(logits.astype(jnp.float32) / self.softcap)).astype(logits.dtype)


@dataclass(frozen=True)
class LayerTraffic:
    """What one layer sends over the mesh, as `jaxlm plan` models its collectives."""

    # Activations of the residual width all-reduced over `tensor` per layer, forward (as many
    # again backward): 2 for a dense block (after attention, after the MLP).
    tensor_reductions: int = 2
    # Key and value elements per token that attention gathers under context parallelism; None: the
    # family does not lay its rows out for context parallelism (mesh.context > 1 is refused).
    context_gathered: int | None = None
    # Mixtures of experts: copies of each token's residual sent to its experts' devices (and
    # back) per layer, averaged over layers, under expert parallelism; and the routed experts'
    # parameters, which `expert` splits and FSDP gathers only over its other axes.
    routed_copies: float = 0.0
    expert_params: int = 0


@dataclass(frozen=True)
class AttentionNeeds:
    """What a family's attention asks of a kernel, so that a kernel that cannot do it is refused in
    one line before compiling."""

    # Tokens a query sees back (itself included) in its layers with a local window, if any.
    sliding_window: int | None = None
    logit_softcap: float | None = None  # soft-capping of the attention scores
    latent: bool = False  # multi-head latent attention: values of another width than keys (not cuDNN)


@dataclass(frozen=True)
class HFTensor:
    """Where one parameter lives in a Hugging Face checkpoint. The tensor `name` ("{layer}" in it
    for each layer of a parameter stacked on a leading `layers` axis, and "{expert}" for each
    expert of one stacked on an `experts` axis after it), of shape `hf_shape`, reshaped to `view`
    and transposed by `order`, is the parameter (one layer, or one layer's expert, of it)."""

    param: str  # path of the parameter in the module: "blocks.attention.wq"
    name: str  # "model.layers.{layer}.self_attn.q_proj.weight"
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]
    order: tuple[int, ...]
    stacked: bool  # the parameter has a leading `layers` axis, one Hugging Face tensor per layer
    experts: int = 0  # and then an `experts` axis of this many, one tensor per expert (0: none)
    # A stack of some of the layers (DeepSeek-V3's dense first ones, then its mixtures): the
    # checkpoint's first layer of it and how many; None: every layer.
    layers: tuple[int, int] | None = None

    def names(self, num_layers: int) -> list[tuple[tuple[int, ...] | None, str]]:
        """(index of the leading axes it fills, or None for the whole parameter; its name) of
        each Hugging Face tensor that holds the parameter."""
        if not self.stacked:
            return [(None, self.name)]
        first, count = self.layers or (0, num_layers)
        if not self.experts:
            return [((layer,), self.name.format(layer=first + layer)) for layer in range(count)]
        return [
            ((layer, expert), self.name.format(layer=first + layer, expert=expert))
            for layer in range(count)
            for expert in range(self.experts)
        ]


@dataclass(frozen=True)
class HuggingFace:
    """A family's conversion to and from Hugging Face transformers (torchtitan's state-dict
    adapter, in the shape of jaxlm's config)."""

    architectures: tuple[str, ...]  # the `architectures` of config.json the family reads
    # config.json → the family's model keys; a UserError (one line) for what it cannot represent.
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    # model config → config.json (with its `architectures`), given the context length of the source
    # the model came from (its max_position_embeddings, or a jaxlm run's data.seq_len) for a family
    # whose config may leave its own unset.
    config_to_hf: Callable[[ModelConfig, int], dict[str, Any]]
    tensors: Callable[[ModelConfig], list[HFTensor]]
    # A prefix of the tensor names that older checkpoints store without: GPT-2's `transformer.`,
    # which the Hub's original GPT-2 files lack. Read either way; written with it.
    optional_prefix: str = ""


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
    # (config, rngs, kernel, lora) → the module, its attention run by `kernel` (a
    # `layers.AttentionKernel`: the families that have only one path may ignore it), with adapters on
    # the targeted projections where `lora` (a `jaxlm.model.lora.LoRASpec`) is not None (families
    # with `projections` only).
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
    # The model keys that shape the parameters: a checkpoint resumes only into a model with the same
    # ones, and model.init_from takes them from its source. Any other key a run may set (a longer
    # context's RoPE, a dtype, a remat policy); what it does not set, init_from takes from the source.
    shape_keys: tuple[str, ...] = ("vocab_size", "d_model", "num_layers", "tie_embeddings")
    # The family's own logical axes (beyond config.SHARED_RULES') → their default mesh axes.
    rules: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)
    # What each layer sends over the mesh (`jaxlm plan`); a family whose traffic gathers keys and
    # values under context parallelism takes `order` (see above).
    traffic: Callable[[ModelConfig], LayerTraffic] = lambda config: LayerTraffic()
    # What its attention asks of a kernel.
    attention: Callable[[ModelConfig], AttentionNeeds] = lambda config: AttentionNeeds()
    # The intermediate tensors its forward names with jax.ad_checkpoint.checkpoint_name, which
    # remat policies save or offload by name (`jaxlm.model.remat` says which names the presets use:
    # a family names those it has, and may add its own for model.remat=custom).
    activations: tuple[str, ...] = ()


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> None:
    """Make `family` available as `model.family=<family.name>`: its config section, its logical
    axes' rules and its checks go to the config."""
    _FAMILIES[family.name] = family

    def check(model: ModelConfig) -> str | None:
        return remat.check(
            model.remat, model.remat_save, model.remat_offload, family.activations, family.name
        )

    rules = {axis: list(mesh_axes) if mesh_axes else None for axis, mesh_axes in family.rules.items()}
    config_module.register_family(family.name, config_module.FamilySection(family.config, rules, check))


def get(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise ConfigError(
            f"model.family={name} is not a model family; use one of {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[name]


def names() -> list[str]:
    """The registered families' names."""
    return sorted(_FAMILIES)


def family_of_architecture(architecture: str) -> ModelFamily:
    """The family that reads Hugging Face checkpoints of `architecture` (config.json's)."""
    for family in _FAMILIES.values():
        if family.hf and architecture in family.hf.architectures:
            return family
    supported = sorted(name for family in _FAMILIES.values() if family.hf for name in family.hf.architectures)
    raise UserError(f"architecture {architecture} is not supported; jaxlm reads {', '.join(supported)}")


def family_of(config: ModelConfig) -> ModelFamily:
    return get(config.family)


def abstract_model(config: ModelConfig, kernel: AttentionKernel = XLA_KERNEL, lora=None) -> nnx.Module:
    """The model as shapes only (with the adapters of `lora`, a LoRASpec, if given): nothing is
    allocated."""
    return nnx.eval_shape(lambda: build(config, nnx.Rngs(0), kernel, lora))


def build(config: ModelConfig, rngs: nnx.Rngs, kernel: AttentionKernel = XLA_KERNEL, lora=None) -> nnx.Module:
    """The family's module, its attention run by `kernel`, with the adapters of `lora` (a
    LoRASpec) if given."""
    return family_of(config).build(config, rngs, kernel, lora)


def parameter_keys_differ(
    family: ModelFamily, saved: Mapping[str, Any], current: Mapping[str, Any]
) -> list[str]:
    """The keys that shape the parameters (`family` among them) on which two model sections differ."""
    return sorted(key for key in ("family", *family.shape_keys) if saved.get(key) != current.get(key))


def share_of_blocks_run(name_stack: str) -> float | None:
    """The share of its grid's blocks that a kernel traced under `name_stack` computes, where a
    kernel that skips blocks says so (splash attention, above the causal diagonal); None where
    none does. FLOP counts (`jaxlm.training.metrics.matmul_flops`) read it."""
    scope = splash.BLOCKS_RUN.search(name_stack)
    return int(scope[1]) / int(scope[2]) if scope else None
