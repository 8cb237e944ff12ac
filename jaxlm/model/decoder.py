"""The rotary decoder that Llama, Mistral, Qwen3 and Gemma 3 share: pre-norm blocks of
grouped-query attention with rotary positions and a gated MLP, stacked on a leading `layers` axis.

What tells the families apart is a `DecoderSpec`, which each family derives from its config:
biases on q/k/v (Qwen2), RMSNorm over each head's queries and keys (Qwen3, Gemma 3), norms that
scale by 1 + w and norms after attention and the MLP too (Gemma), GeGLU instead of SwiGLU, scaled
embeddings, the query scale, soft-capped scores and logits (Gemma 2), and per layer a sliding
window and its rotary frequencies (Mistral: every layer a window; Gemma 3: local layers with
their own base between global ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from pydantic import Field, model_validator

from jaxlm.config import ModelConfig
from jaxlm.model import remat, splash
from jaxlm.model.layers import (
    XLA_KERNEL,
    AttentionKernel,
    FrequencyScaling,
    RMSNorm,
    cache_masks,
    cached_attention,
    cudnn_attention,
    document_boundaries,
    dtype_of,
    over_layers,
    param,
    rotary,
    rotary_angles,
    xla_attention,
)
from jaxlm.model.lora import Adapters, LoRASpec, key_for
from jaxlm.model.mla import MLA, MLASpec
from jaxlm.model.moe import MoE, MoESpec
from jaxlm.model.registry import (
    AttentionNeeds,
    HuggingFace,
    LayerTraffic,
    ModelFamily,
    ModelOutput,
    OutputHead,
    Projection,
)
from jaxlm.parallel import constrain


class DecoderConfig(ModelConfig):
    """The keys every rotary decoder family has."""

    num_heads: int = Field(4, gt=0, description="Query heads.")
    num_kv_heads: int | None = Field(
        None, gt=0, description="Key/value heads (grouped-query attention); null = num_heads."
    )
    head_dim: int | None = Field(None, gt=0, description="Width of one head; null = d_model / num_heads.")
    mlp_dim: int = Field(512, gt=0, description="Hidden width of the gated MLP.")
    rope_theta: float = Field(10000.0, gt=0, description="Base of the rotary position frequencies.")
    context_length: int | None = Field(
        None,
        gt=0,
        description="Longest sequence the model is made for (Hugging Face's max_position_embeddings, which import sets and export writes); null = data.seq_len.",
    )
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of RMSNorm.")

    @model_validator(mode="after")
    def _heads(self) -> DecoderConfig:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads="
                f"{self.num_kv_heads}; pick num_kv_heads among its divisors"
            )
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"model.d_model={self.d_model} is not divisible by model.num_heads="
                    f"{self.num_heads}; change one or set model.head_dim"
                )
            self.head_dim = self.d_model // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        return self


class MoEConfig(DecoderConfig):
    """The keys of a decoder whose MLPs are mixtures of experts (`moe.py`); `mlp_dim` is each
    routed expert's hidden width."""

    num_experts: int = Field(8, gt=0, description="Routed experts in each layer (num_local_experts).")
    experts_per_token: int = Field(
        2, gt=0, description="Experts each token goes through (num_experts_per_tok): the router's top k."
    )
    capacity_factor: float | None = Field(
        None,
        gt=0,
        description="Null: dropless (every token reaches its experts). A number: each expert takes at most capacity_factor × tokens × experts_per_token / num_experts tokens per step and drops the rest.",
    )
    receive_factor: float | None = Field(
        None,
        ge=1,
        description="Dropless under expert parallelism (mesh.expert > 1): the rows a device's experts receive per layer at most, as a multiple of the rows each device routes (1: an even share). Null: the worst case (mesh.expert ×), never dropping, and the grouped matmuls run over that buffer; a bound drops what overflows (moe/dropped).",
    )
    moe_kernel: Literal["auto", "ragged_dot", "megablox"] = Field(
        "auto",
        description="Grouped matmuls of the dropless experts: ragged_dot (jax.lax.ragged_dot, any device and mesh), megablox (the Pallas TPU kernel, in the experts' shard_map on a mesh), auto (ragged_dot).",
    )
    load_balance_weight: float = Field(
        0.01,
        ge=0,
        description="Weight of the load-balancing auxiliary loss (router_aux_loss_coef), averaged over layers.",
    )
    router_z_weight: float = Field(
        0.0, ge=0, description="Weight of the router z-loss (ST-MoE), averaged over layers."
    )

    @model_validator(mode="after")
    def _experts(self) -> MoEConfig:
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"model.experts_per_token={self.experts_per_token} is more than model.num_experts="
                f"{self.num_experts}; choose at most {self.num_experts}"
            )
        if self.receive_factor is not None and self.capacity_factor is not None:
            raise ValueError(
                f"model.receive_factor={self.receive_factor} bounds the dropless experts, and "
                f"model.capacity_factor={self.capacity_factor} makes them drop by capacity instead; set one of them"
            )
        return self


def moe_spec(config: MoEConfig, **router) -> MoESpec:
    """The MoE layer of `config` (moe_kernel auto is resolved where the model is built, for its
    devices); `router`: the family's router settings (`MoESpec` fields)."""
    return MoESpec(
        num_experts=config.num_experts,
        top_k=config.experts_per_token,
        expert_dim=config.mlp_dim,
        capacity_factor=config.capacity_factor,
        receive_factor=config.receive_factor,
        kernel=config.moe_kernel,
        balance_weight=config.load_balance_weight,
        z_weight=config.router_z_weight,
        **router,
    )


@dataclass(frozen=True)
class LayerKind:
    """How one kind of layer attends: its window and its rotary frequencies."""

    window: int | None = None  # tokens a query sees back, itself included; None: the whole row
    rope_theta: float = 10000.0
    rope_scaling: FrequencyScaling | None = None


@dataclass(frozen=True)
class DecoderSpec:
    """What a family's decoder computes beyond its sizes; static (part of the module's definition)."""

    kinds: tuple[LayerKind, ...]  # the kinds of layer there are
    layer_kinds: tuple[int, ...]  # each layer's, an index into `kinds`
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before rotary positions
    qk_norm_all_heads: bool = False  # the q and k norms span all heads together (OLMoE)
    norm_plus_one: bool = False  # norms scale by 1 + w, w born 0 (Gemma)
    post_norms: bool = False  # norms of attention's and the MLP's outputs, before the residual (Gemma)
    activation: str = "silu"  # of the gated MLP: silu (SwiGLU) or gelu_tanh (GeGLU)
    embed_scale: bool = False  # embeddings × √d_model (Gemma)
    query_scale: float | None = None  # scores' scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores → cap · tanh(scores / cap)
    final_softcap: float | None = None  # logits → cap · tanh(logits / cap)
    moe: MoESpec | None = None  # every layer's MLP a mixture of experts (model/moe.py)...
    dense_layers: int = (
        0  # ...but the first this many, whose MLP is dense (DeepSeek-V3's first_k_dense_replace)
    )
    dense_mlp_dim: int = 0  # those layers' MLP width
    mla: MLASpec | None = None  # multi-head latent attention (model/mla.py) instead of grouped-query


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

# The metric that carries each MoE layer's per-expert load [layers, experts] to the train step,
# which balances the sigmoid routers' biases by it (`moe.balanced_bias`) and logs it no further.
EXPERT_LOAD = "moe/expert_load"


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_length` tokens per row, filled up to `length`."""

    # [layers, batch, kv_heads, max_length, head_dim]: each kv head's slots are one run, as the
    # attention einsums read them (no per-step relayout of the cache).
    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array  # [batch, max_length] int32; 0 in slots not yet written
    length: jax.Array  # int32 scalar: slots written, the same in every row
    # Known when tracing: a new cache (`init_cache`) has nothing to read, so a prefill into it
    # attends over the prompt only, not over every empty slot too.
    empty: bool = flax.struct.field(pytree_node=False, default=False)

    @staticmethod
    def logical_axes() -> KVCache:
        """Each array's logical axes: rows split like the batch, kv heads like the attention's
        (tensor parallelism). Slots stay whole: a decode step writes one slot of every row."""
        slots = ("layers", "batch", "act_kv_heads", None, None)
        return KVCache(keys=slots, values=slots, segment_ids=("batch", None), length=())

    def appended(self, keys: jax.Array, values: jax.Array, segment_ids: jax.Array) -> KVCache:
        """The cache with every layer's keys and values of new tokens ([layers, batch, length,
        kv_heads, head_dim], as the layers return them) written at slots [length, length + new
        tokens): once, into the whole stack."""
        keys, values = (  # → the cache's layout
            jax.lax.dynamic_update_slice_in_dim(stack, new.transpose(0, 1, 3, 2, 4), self.length, axis=3)
            for stack, new in ((self.keys, keys), (self.values, values))
        )
        segments = jax.lax.dynamic_update_slice_in_dim(self.segment_ids, segment_ids, self.length, axis=1)
        return KVCache(keys, values, segments, self.length + segment_ids.shape[1])


def _norm(config: DecoderConfig, spec: DecoderSpec, dim, axis="embed") -> RMSNorm:
    return RMSNorm(dim, config.norm_eps, dtype_of(config.param_dtype), spec.norm_plus_one, axis)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(
        self,
        config: DecoderConfig,
        spec: DecoderSpec,
        rngs: nnx.Rngs,
        kernel: AttentionKernel,
        lora: LoRASpec | None = None,
    ):
        d, h, k, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        pdt = dtype_of(config.param_dtype)
        out_std = config.init_std / (2 * config.num_layers) ** 0.5
        self.kernel, self.qkv_bias, self.softcap = kernel, spec.qkv_bias, spec.attn_softcap
        # The kernels scale queries by head_dim ** -0.5; another scale is folded into the queries.
        self.query_factor = None if spec.query_scale is None else spec.query_scale * hd**0.5
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), config.init_std, pdt)
        self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), config.init_std, pdt)
        self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), config.init_std, pdt)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std, pdt)
        if spec.qkv_bias:
            self.bq = bias((h, hd), ("heads", "head_dim"), pdt)
            self.bk = bias((k, hd), ("kv_heads", "head_dim"), pdt)
            self.bv = bias((k, hd), ("kv_heads", "head_dim"), pdt)
        if spec.qk_norm_all_heads:
            self.q_norm = _norm(config, spec, (h, hd), ("heads", "head_dim"))
            self.k_norm = _norm(config, spec, (k, hd), ("kv_heads", "head_dim"))
        elif spec.qk_norm:
            self.q_norm = _norm(config, spec, hd, "head_dim")
            self.k_norm = _norm(config, spec, hd, "head_dim")
        weights = {"wq": (self.wq, 1), "wk": (self.wk, 1), "wv": (self.wv, 1), "wo": (self.wo, 2)}
        self.lora = Adapters(weights, lora, rngs)

    def __call__(self, x: jax.Array, rope, documents, cache=None, dropout_key=None):
        """x: [batch, length, embed]; rope: `rotary_angles`; documents: `document_boundaries`, or
        with a cache its `cache_masks`. cache: this layer's keys and values [batch, kv_heads,
        max_length, head_dim] (`KVCache`'s layout), read only; None each for an empty cache.
        dropout_key: the adapters' (training only). Returns the output and, with a cache, x's keys
        and values [batch, length, kv_heads, head_dim] for the caller to write."""
        dt = x.dtype

        def project(name: str, equation: str, inputs: jax.Array) -> jax.Array:  # x·W (+ x·A·B·scale)
            y = jnp.einsum(equation, inputs, getattr(self, name)[...].astype(dt))
            return self.lora(name, inputs, y, dropout_key)

        q = project("wq", "bte,ehd->bthd", x)  # [batch, length, heads, head_dim]
        k = project("wk", "bte,ekd->btkd", x)  # [batch, length, kv_heads, head_dim]
        v = project("wv", "bte,ekd->btkd", x)
        if self.qkv_bias:
            q, k, v = (t + b[...].astype(dt) for t, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
        q, k, v = (checkpoint_name(t, n) for t, n in zip((q, k, v), remat.QKV, strict=True))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.query_factor is not None:
            q = q * jnp.asarray(self.query_factor, dt)
        q = constrain(rotary(q, *rope), ("batch", "length", "act_heads", None))
        k = constrain(rotary(k, *rope), ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        if cache is not None:
            # The cache's slots (none in an empty one) and the new tokens with their
            # `cache_masks`: the XLA einsums, whatever attention.kernel. The new keys and values
            # go back to be written.
            keys, values = cache
            if keys is None:
                out = xla_attention(q, k, v, documents[1], self.softcap)
            else:
                k, v = k.astype(keys.dtype), v.astype(values.dtype)
                out = cached_attention(q, k, v, keys, values, documents, self.softcap)
            cache = (k, v)
        elif self.kernel.kind == "cudnn":
            out = cudnn_attention(q, k, v, documents)
        elif self.kernel.kind == "splash":
            blocks = self.kernel.splash_block_q, self.kernel.splash_block_kv, self.kernel.splash_interpret
            out = documents.attend(q, k, v, *blocks)  # splash.Documents
        else:
            # Context parallelism: each shard's queries meet the keys and values of the whole
            # row, gathered here (and their gradients reduce-scattered back in the backward).
            k = constrain(k, ("batch", None, "act_kv_heads", None))
            v = constrain(v, ("batch", None, "act_kv_heads", None))
            out = xla_attention(q, k, v, documents, self.softcap)  # [batch, length, heads, head_dim]
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), "attention_out")
        return checkpoint_name(project("wo", "bthd,hde->bte", out), "out_proj"), cache


class MLP(nnx.Module):
    """A gated MLP: down(activation(gate(x)) * up(x)); SwiGLU with silu, GeGLU with gelu."""

    def __init__(
        self, config: DecoderConfig, spec: DecoderSpec, rngs: nnx.Rngs, lora: LoRASpec | None = None
    ):
        d, m = config.d_model, config.mlp_dim
        pdt = dtype_of(config.param_dtype)
        out_std = config.init_std / (2 * config.num_layers) ** 0.5
        self.activation = spec.activation
        self.w_gate = param(rngs, (d, m), ("embed", "mlp"), config.init_std, pdt)
        self.w_up = param(rngs, (d, m), ("embed", "mlp"), config.init_std, pdt)
        self.w_down = param(rngs, (m, d), ("mlp", "embed"), out_std, pdt)
        weights = {"w_gate": (self.w_gate, 1), "w_up": (self.w_up, 1), "w_down": (self.w_down, 1)}
        self.lora = Adapters(weights, lora, rngs)

    def __call__(self, x: jax.Array, dropout_key=None) -> jax.Array:
        dt = x.dtype

        def project(name: str, equation: str, inputs: jax.Array) -> jax.Array:  # x·W (+ x·A·B·scale)
            y = jnp.einsum(equation, inputs, getattr(self, name)[...].astype(dt))
            return self.lora(name, inputs, y, dropout_key)

        gate = checkpoint_name(project("w_gate", "bte,em->btm", x), "mlp_gate")
        up = checkpoint_name(project("w_up", "bte,em->btm", x), "mlp_up")
        hidden = ACTIVATIONS[self.activation](gate) * up
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))  # [batch, length, mlp]
        return checkpoint_name(project("w_down", "btm,me->bte", hidden), "mlp_down")


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with post norms,
    x + post_norm(attn(norm(x))) and the same for the MLP."""

    def __init__(
        self,
        config: DecoderConfig,
        spec: DecoderSpec,
        rngs: nnx.Rngs,
        kernel: AttentionKernel,
        lora: LoRASpec | None = None,
    ):
        self.attention_norm = _norm(config, spec, config.d_model)
        if spec.mla is None:
            self.attention = Attention(config, spec, rngs, kernel, lora)
        else:
            out_std = config.init_std / (2 * config.num_layers) ** 0.5
            pdt = dtype_of(config.param_dtype)
            self.attention = MLA(config.d_model, spec.mla, rngs, config.init_std, out_std, pdt, kernel)
        self.mlp_norm = _norm(config, spec, config.d_model)
        if spec.moe is None:
            self.mlp = MLP(config, spec, rngs, lora)
        else:
            out_std = config.init_std / (2 * config.num_layers) ** 0.5
            pdt = dtype_of(config.param_dtype)
            moe = spec.moe
            if moe.kernel == "auto":  # megablox is not yet measured against it on a TPU
                moe = dataclasses.replace(moe, kernel="ragged_dot")
            self.mlp = MoE(config.d_model, moe, rngs, config.init_std, out_std, pdt)
        if spec.post_norms:
            self.attention_post_norm = _norm(config, spec, config.d_model)
            self.mlp_post_norm = _norm(config, spec, config.d_model)

    def __call__(self, x: jax.Array, rope, documents, cache=None, dropout_key=None):
        """x, its keys and values with a cache (else None), and the MoE layer's auxiliary losses
        and statistics (`moe.MoEOutput` without y; None for a dense MLP)."""
        normed = checkpoint_name(self.attention_norm(x), "attention_norm")
        attended, cache = self.attention(normed, rope, documents, cache, key_for(dropout_key, 0))
        if hasattr(self, "attention_post_norm"):
            attended = self.attention_post_norm(attended)
        x = x + attended
        normed = checkpoint_name(self.mlp_norm(x), "mlp_norm")
        routed = None
        if isinstance(self.mlp, MoE):
            routed = self.mlp(normed)
            transformed, routed = routed.y, routed._replace(y=None)
        else:
            transformed = self.mlp(normed, key_for(dropout_key, 1))
        if hasattr(self, "mlp_post_norm"):
            transformed = self.mlp_post_norm(transformed)
        return constrain(x + transformed, ("batch", "length", "act_embed")), cache, routed


class Decoder(nnx.Module):
    """A rotary decoder LM. Blocks are stacked on a leading `layers` axis and run with a scan,
    so compile time does not grow with depth; with `scan_layers=False` the same stacked
    parameters are applied layer by layer, unrolled (faster steps on CPU, slower compiles)."""

    def __init__(
        self,
        config: DecoderConfig,
        spec: DecoderSpec,
        rngs: nnx.Rngs,
        kernel: AttentionKernel = XLA_KERNEL,
        lora: LoRASpec | None = None,
    ):
        pdt = dtype_of(config.param_dtype)
        self.dtype = dtype_of(config.dtype)
        self.remat = (config.remat, tuple(config.remat_save), tuple(config.remat_offload))  # hashable: static
        self.spec, self.kernel = spec, kernel
        self.scan_layers = config.scan_layers
        self.num_layers, self.num_kv_heads = config.num_layers, config.num_kv_heads
        self.head_dim, self.d_model = config.head_dim, config.d_model
        # Rotary channels per head; latent attention caches one latent and positional key per token.
        self.rope_dim = config.head_dim if spec.mla is None else spec.mla.rope_dim
        self.dense_layers = spec.dense_layers
        self.tie_embeddings = config.tie_embeddings
        self.embedding = param(
            rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), config.init_std, pdt
        )

        def stack(count: int, config: DecoderConfig, spec: DecoderSpec):
            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked_blocks(rngs: nnx.Rngs) -> Block:
                return Block(config, spec, rngs, kernel, lora)

            return stacked_blocks(rngs)

        if spec.dense_layers:  # the dense first layers, then the mixtures: two stacks, two scans
            dense = config.model_copy(update={"mlp_dim": spec.dense_mlp_dim})
            self.dense_blocks = stack(spec.dense_layers, dense, dataclasses.replace(spec, moe=None))
        self.blocks = stack(config.num_layers - spec.dense_layers, config, spec)
        self.final_norm = _norm(config, spec, config.d_model)
        if not config.tie_embeddings:
            self.lm_head = param(
                rngs, (config.d_model, config.vocab_size), ("embed", "vocab"), config.init_std, pdt
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
        *,
        return_hidden: bool = False,
        dropout_key: jax.Array | None = None,
        order: np.ndarray | None = None,
    ) -> ModelOutput:
        """tokens, positions, segment_ids: [batch, length] int32 → logits [batch, length, vocab]
        (or the final normed hidden states [batch, length, embed]) and the cache with these
        tokens appended (None without one). dropout_key: LoRA dropout's, in training. order: None
        for rows in their own order, else the original position of each of their positions
        (rows laid out for context parallelism, `parallel.load_balanced_order`; no cache)."""
        # Gather from a table replicated for the lookup (as FSDP gathers every weight before use);
        # a gather from a vocab- and embed-sharded table cannot be partitioned without copies.
        table = constrain(self.embedding[...], (None, "act_embed"))
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)  # [batch, length, embed]
        if self.spec.embed_scale:
            x = x * jnp.asarray(self.d_model**0.5, self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        reported = {}
        if cache is None:
            x, routed = self._blocks(x, positions, segment_ids, order, dropout_key)
            reported = self._moe_report(routed)
        else:
            x, cache = self._blocks_with_cache(x, positions, segment_ids, cache)
        hidden = self.final_norm(x)
        if return_hidden:
            return ModelOutput(hidden=hidden, cache=cache, **reported)
        logits = constrain(self.output_head().logits(hidden), ("batch", "length", "act_vocab"))
        return ModelOutput(logits=logits, cache=cache, **reported)

    def _moe_report(self, routed) -> dict[str, dict[str, jax.Array]]:
        """The MoE layers' auxiliary losses, each the mean over layers times its weight (those of
        weight 0 left out), and their load: `moe/load_max` and `moe/load_min`, the most and least
        loaded expert of any layer as a multiple of an even share (1 when balanced), and
        `moe/dropped`, the share of assignments the capacity dropped (0 dropless)."""
        if routed is None:
            return {}
        weights = {"load_balance": self.spec.moe.balance_weight, "router_z": self.spec.moe.z_weight}
        losses = {
            name: weight * jnp.mean(routed.aux_losses[name]) for name, weight in weights.items() if weight
        }
        experts = routed.load.shape[-1]
        metrics = {
            "moe/load_max": jnp.max(routed.load) * experts,
            "moe/load_min": jnp.min(routed.load) * experts,
            "moe/dropped": jnp.mean(routed.dropped),
        }
        if self.spec.moe.router == "sigmoid":  # what the step balances the routers' biases by
            metrics[EXPERT_LOAD] = routed.load  # [layers with experts, experts]
        return {"aux_losses": losses, "metrics": metrics}

    def _rope(self, kind: LayerKind, positions: jax.Array, table_length: int):
        return rotary_angles(positions, self.rope_dim, kind.rope_theta, table_length, kind.rope_scaling)

    def _per_kind(self, shared):
        """What every layer shares, computed once per kind of layer: `shared(kind)` for each, and
        each layer's index into them, a list (None where every layer is of one kind)."""
        per_kind = [shared(kind) for kind in self.spec.kinds]
        if len(per_kind) == 1:
            return per_kind[0], None
        return per_kind, list(self.spec.layer_kinds)

    @staticmethod
    def _select(per_kind, kind_index):
        """The layer's own of what `_per_kind` computed: picked for an unrolled layer (kind_index
        an int), selected for a scanned one (kind_index traced)."""
        if kind_index is None:
            return per_kind
        if isinstance(kind_index, int):
            return per_kind[kind_index]
        return jax.tree.map(lambda *options: jnp.stack(options)[kind_index], *per_kind)

    def _blocks(self, x: jax.Array, positions, segment_ids, order, dropout_key=None):
        """x through the blocks, and what the MoE layers report, stacked over layers (None for dense)."""

        def shared(kind: LayerKind):
            rope = self._rope(kind, positions, positions.shape[1])
            documents = document_boundaries(self.kernel, segment_ids, order, kind.window)
            if self.kernel.kind == "splash":  # a kernel per window, chosen by the layer's kind
                windows = tuple(other.window for other in self.spec.kinds)
                index = self.spec.kinds.index(kind)
                documents = splash.Documents(documents.segment_ids, index, documents.order, windows)
            elif self.kernel.kind != "cudnn":  # each context shard builds its queries' rows
                documents = constrain(documents, ("batch", None, "length", None))
            return rope, documents

        per_kind, kinds = self._per_kind(shared)
        # One dropout key per layer, scanned with its parameters.
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
        routed = None
        for blocks, layers in self._stacks():
            block_def, block_params = nnx.split(blocks)

            def apply_block(x, layer, block_def=block_def):
                layer_params, key, kind = layer
                rope, documents = self._select(per_kind, kind)
                x, _, routed = nnx.merge(block_def, layer_params)(x, rope, documents, dropout_key=key)
                return x, routed

            apply_block = remat.checkpointed(apply_block, *self.remat)
            scanned = (block_params, _part(keys, layers), _part(kinds, layers))
            x, routed = over_layers(apply_block, x, scanned, self.scan_layers)
        return x, routed  # the mixtures' (the last stack's)

    def _stacks(self) -> list[tuple[nnx.Module, slice]]:
        """The stacks of blocks in order, each with the layers it holds."""
        if not self.dense_layers:
            return [(self.blocks, slice(0, self.num_layers))]
        first = self.dense_layers
        return [(self.dense_blocks, slice(0, first)), (self.blocks, slice(first, self.num_layers))]

    def _blocks_with_cache(self, x, positions, segment_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The blocks over tokens that continue the cache's rows, writing their keys and values
        at slots [length, length + tokens): once, into the whole stack, after every layer has
        read the cache (the layers return only the new slots, not a new copy of their cache)."""
        max_length = cache.segment_ids.shape[1]

        def shared(kind: LayerKind):
            masks = cache_masks(segment_ids, cache.segment_ids, cache.length, kind.window)
            return self._rope(kind, positions, max_length), masks

        per_kind, kinds = self._per_kind(shared)
        written = []
        for blocks, layers in self._stacks():
            block_def, block_params = nnx.split(blocks)

            def apply_block(x, layer, block_def=block_def):
                layer_params, keys, values, kind = layer
                rope, documents = self._select(per_kind, kind)
                return nnx.merge(block_def, layer_params)(x, rope, documents, (keys, values))[:2]

            read = (None, None) if cache.empty else (cache.keys[layers], cache.values[layers])
            scanned = (block_params, *read, _part(kinds, layers))
            x, new = over_layers(apply_block, x, scanned, self.scan_layers)
            written.append(new)
        keys, values = (
            jnp.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*written, strict=True)
        )
        return x, cache.appended(keys, values, segment_ids)

    def output_head(self) -> OutputHead:
        """The LM head [embed, vocab] in the compute dtype, or the transposed embedding if tied."""
        weight = self.embedding[...].T if self.tie_embeddings else self.lm_head[...]
        return OutputHead(weight.astype(self.dtype), self.spec.final_softcap)

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty cache; under `parallel.activation_sharding` (in a jitted function) it is born
        sharded by `KVCache.logical_axes`."""
        shape = (self.num_layers, batch, self.num_kv_heads, max_length)
        widths = (self.head_dim, self.head_dim)
        if self.spec.mla is not None:  # one latent and one positional key per token
            shape, widths = (self.num_layers, batch, 1, max_length), (self.spec.mla.kv_rank, self.rope_dim)
        axes = KVCache.logical_axes()
        return KVCache(
            keys=constrain(jnp.zeros((*shape, widths[0]), self.dtype), axes.keys),
            values=constrain(jnp.zeros((*shape, widths[1]), self.dtype), axes.values),
            segment_ids=constrain(jnp.zeros((batch, max_length), jnp.int32), axes.segment_ids),
            length=jnp.zeros((), jnp.int32),
            empty=True,
        )


def _part(per_layer, layers: slice):
    """The layers' part of something given per layer (a list, an array, or None)."""
    return None if per_layer is None else per_layer[layers]


def bias(shape: tuple[int, ...], logical_axes: tuple[str, ...], dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=logical_axes, eager_sharding=False)


def matmul_params(config: DecoderConfig) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup does not); of a
    mixture of experts, those of the experts a token goes through (its active parameters)."""
    d, h, k, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    attention = d * h * hd + 2 * d * k * hd + h * hd * d
    mlp = 3 * d * config.mlp_dim
    if isinstance(config, MoEConfig):  # active parameters: the router and the chosen experts
        mlp = d * config.num_experts + config.experts_per_token * mlp
    return config.num_layers * (attention + mlp) + d * config.vocab_size


def flops_per_token(config: DecoderConfig, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward + backward), plus attention scores
    and values over the whole row (12·layers·heads·head_dim·seq_len, causal masking and windows not
    discounted, as XLA computes them). Heads are head_dim wide whatever d_model is; biases and
    norms are left out, as in the usual 6N count. With `frozen_weights` (LoRA) no weight gets a
    gradient: 4 per matmul parameter (the adapters' own few are left out)."""
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return (4 if frozen_weights else 6) * matmul_params(config) + attention


def traffic(config: DecoderConfig) -> LayerTraffic:
    """Two all-reduces of the residual stream per block under tensor parallelism (after attention
    and after the MLP); under context parallelism each layer gathers every token's keys and values."""
    gathered = 2 * config.num_kv_heads * config.head_dim
    if isinstance(config, MoEConfig):  # every token's copies to its experts' devices and back
        experts = config.num_layers * config.num_experts * 3 * config.d_model * config.mlp_dim
        return LayerTraffic(2, gathered, routed_copies=config.experts_per_token, expert_params=experts)
    return LayerTraffic(tensor_reductions=2, context_gathered=gathered)


def decays(path: str, decay_embeddings: bool) -> bool:
    """Weight matrices decay; norm scales and biases never; the embedding only with
    optim.decay_embeddings."""
    name = path.rsplit(".", 1)[-1]
    if name in ("scale", "bq", "bk", "bv", "router_bias"):
        return False
    return decay_embeddings or name != "embedding"


# The decoder's own logical axes → mesh axes: heads and the MLP's width split by tensor parallelism.
RULES = {
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
}

# A mixture of experts' axes: experts over `expert` (expert parallelism), each expert's hidden
# width over `tensor` as the dense MLP's; the rest of the model uses `expert` as FSDP: rows and
# the residual stream's parameters split over it too.
MOE_RULES = {
    "expert": ("expert",),
    "expert_mlp": ("tensor",),
    "batch": ("data", "fsdp", "expert"),
    "embed": ("fsdp", "context", "expert"),
}

PROJECTIONS = (
    Projection("blocks.attention.wq", inputs=1),  # [embed | heads, head_dim]
    Projection("blocks.attention.wk", inputs=1),  # [embed | kv_heads, head_dim]
    Projection("blocks.attention.wv", inputs=1),
    Projection("blocks.attention.wo", inputs=2),  # [heads, head_dim | embed]
    Projection("blocks.mlp.w_gate", inputs=1),  # [embed | mlp]
    Projection("blocks.mlp.w_up", inputs=1),
    Projection("blocks.mlp.w_down", inputs=1),  # [mlp | embed]
)

# Its named activations (remat.py's), and the projections LoRA adapts by default (the attention's).
NAMED_ACTIVATIONS = (*remat.NORMS, *remat.ATTENTION, *remat.MLP)
LORA_TARGETS = ("wq", "wk", "wv", "wo")

SHAPE_KEYS = (
    *("vocab_size", "d_model", "num_layers", "tie_embeddings"),
    *("num_heads", "num_kv_heads", "head_dim", "mlp_dim"),
)


def family(
    name: str,
    config: type[DecoderConfig],
    spec: Callable[[DecoderConfig], DecoderSpec],
    hf: HuggingFace,
    shape_keys: tuple[str, ...] = SHAPE_KEYS,
    moe: bool = False,
    *,
    flops: Callable | None = None,
    layer_traffic: Callable | None = None,
    attention: Callable | None = None,
    rules: dict | None = None,
    projections: tuple | None = None,
) -> ModelFamily:
    """The registry entry of a family of this decoder: its name, config section, `spec` (what the
    decoder computes for a config) and Hugging Face conversion; the decoder answers the rest
    (FLOPs, weight decay, logical axes and their rules, collective traffic, LoRA projections,
    named activations), and what its attention needs follows from the spec's windows and cap.
    `moe`: its MLPs are mixtures of experts (the experts' axes, and LoRA on attention only). A
    family whose layers differ more (DeepSeek-V3's latent attention) gives its own `flops`,
    `layer_traffic`, `attention` needs, extra `rules` and LoRA `projections`."""

    def build(
        config: DecoderConfig, rngs, kernel: AttentionKernel = XLA_KERNEL, lora: LoRASpec | None = None
    ):
        return Decoder(config, spec(config), rngs, kernel, lora)

    def attention_needs(config: DecoderConfig) -> AttentionNeeds:
        computed = spec(config)
        windows = [kind.window for kind in computed.kinds if kind.window is not None]
        return AttentionNeeds(sliding_window=max(windows, default=None), logit_softcap=computed.attn_softcap)

    default_projections = PROJECTIONS[:4] if moe else PROJECTIONS  # LoRA adapts no expert (yet)
    return ModelFamily(
        name=name,
        config=config,
        build=build,
        flops_per_token=flops or flops_per_token,
        decays=decays,
        hf=hf,
        projections=default_projections if projections is None else projections,
        lora_targets=LORA_TARGETS,
        shape_keys=shape_keys,
        rules={**RULES, **(MOE_RULES if moe else {}), **(rules or {})},
        traffic=layer_traffic or traffic,
        attention=attention or attention_needs,
        activations=NAMED_ACTIVATIONS,
    )
