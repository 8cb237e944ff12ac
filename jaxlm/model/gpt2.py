"""The GPT-2 family (transformers' GPT2LMHeadModel): learned positions added to the token
embeddings, pre-LayerNorm blocks of multi-head causal attention and a GELU MLP (tanh
approximation), a bias on every projection, and the output head tied to the embedding. Its
config keys, its module, its FLOPs and weight-decay rule, its Hugging Face conversion and its
registry entry.

Parameters keep GPT-2's fused attention input: `wqkv` [embed, 3, heads, head_dim] is c_attn's
Conv1D weight [d, 3d] viewed as (d, 3, heads, head_dim), so import and export move it whole.
Blocks are stacked on a leading `layers` axis like the rotary decoder's, and generation keeps
keys and values in its `KVCache`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from pydantic import Field, model_validator

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, UserError
from jaxlm.model import remat
from jaxlm.model.decoder import KVCache, bias
from jaxlm.model.layers import (
    XLA_KERNEL,
    AttentionKernel,
    LayerNorm,
    cache_masks,
    cached_attention,
    cudnn_attention,
    document_boundaries,
    dtype_of,
    over_layers,
    param,
    xla_attention,
)
from jaxlm.model.lora import Adapters, LoRASpec, key_for
from jaxlm.model.registry import (
    HFTensor,
    HuggingFace,
    LayerTraffic,
    ModelFamily,
    ModelOutput,
    OutputHead,
    Projection,
)
from jaxlm.parallel import constrain

ARCHITECTURE = "GPT2LMHeadModel"
# transformers' names of GELU's tanh approximation, the MLP's activation in GPT-2.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class GPT2Config(ModelConfig):
    num_heads: int = Field(4, gt=0, description="Attention heads (n_head), each d_model / num_heads wide.")
    mlp_dim: int | None = Field(
        None, gt=0, description="Hidden width of the MLP (n_inner); null = 4 × d_model."
    )
    context_length: int = Field(
        1024,
        gt=0,
        description="Rows of the learned position table (n_positions): the longest row the model takes; at least data.seq_len.",
    )
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of LayerNorm (layer_norm_epsilon).")
    tie_embeddings: bool = Field(
        True, description="GPT-2 always uses its embedding table as the output projection; false is refused."
    )

    @model_validator(mode="after")
    def _shape(self) -> GPT2Config:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them"
            )
        if not self.tie_embeddings:
            raise ValueError(
                "model.tie_embeddings=false: GPT-2 has no output projection of its own; drop the key"
            )
        if self.mlp_dim is None:
            self.mlp_dim = 4 * self.d_model
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def affine(module: nnx.Module, weight: str, bias: str, equation: str, x: jax.Array, dropout_key) -> jax.Array:
    """x·W + b of one of the module's projections (+ x·A·B·scale where LoRA adapts W), in x's dtype."""
    dt = x.dtype
    y = jnp.einsum(equation, x, getattr(module, weight)[...].astype(dt))
    return module.lora(weight, x, y, dropout_key) + getattr(module, bias)[...].astype(dt)


class Attention(nnx.Module):
    """Multi-head causal self-attention, q, k and v projected by one fused weight."""

    def __init__(self, config: GPT2Config, rngs: nnx.Rngs, kernel: AttentionKernel, lora: LoRASpec | None):
        d, h, hd = config.d_model, config.num_heads, config.head_dim
        pdt = dtype_of(config.param_dtype)
        out_std = config.init_std / (2 * config.num_layers) ** 0.5  # GPT-2's scaled residual init
        self.kernel = kernel
        self.wqkv = param(rngs, (d, 3, h, hd), ("embed", None, "heads", "head_dim"), config.init_std, pdt)
        self.bqkv = bias((3, h, hd), (None, "heads", "head_dim"), pdt)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std, pdt)
        self.bo = bias((d,), ("embed",), pdt)
        self.lora = Adapters({"wqkv": (self.wqkv, 1), "wo": (self.wo, 2)}, lora, rngs)

    def __call__(self, x: jax.Array, documents, cache=None, dropout_key=None):
        """x: [batch, length, embed]; documents: `document_boundaries`, or with a cache its
        `cache_masks`. cache: this layer's keys and values [batch, heads, max_length, head_dim]
        (`KVCache`'s layout), read only; None each for an empty cache. Returns the output and,
        with a cache, x's keys and values [batch, length, heads, head_dim] for the caller to write."""
        # [batch, length, 3, heads, head_dim]: q, k and v of each head, as c_attn lays them out
        qkv = affine(self, "wqkv", "bqkv", "bte,ezhd->btzhd", x, dropout_key)
        q, k, v = (checkpoint_name(qkv[:, :, i], name) for i, name in enumerate(remat.QKV))
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        if cache is not None:
            # The cache's slots (none in an empty one) and the new tokens, with the XLA einsums
            # whatever attention.kernel; the new keys and values go back to be written.
            keys, values = cache
            if keys is None:
                out = xla_attention(q, k, v, documents[1])
            else:
                k, v = k.astype(keys.dtype), v.astype(values.dtype)
                out = cached_attention(q, k, v, keys, values, documents)
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
            out = xla_attention(q, k, v, documents)  # [batch, length, heads, head_dim]
        out = checkpoint_name(constrain(out, ("batch", "length", "act_heads", None)), "attention_out")
        projected = affine(self, "wo", "bo", "bthd,hde->bte", out, dropout_key)
        return checkpoint_name(projected, "out_proj"), cache


class MLP(nnx.Module):
    """down(gelu_tanh(up(x))), with biases."""

    def __init__(self, config: GPT2Config, rngs: nnx.Rngs, lora: LoRASpec | None):
        d, m = config.d_model, config.mlp_dim
        pdt = dtype_of(config.param_dtype)
        out_std = config.init_std / (2 * config.num_layers) ** 0.5
        self.w_up = param(rngs, (d, m), ("embed", "mlp"), config.init_std, pdt)
        self.b_up = bias((m,), ("mlp",), pdt)
        self.w_down = param(rngs, (m, d), ("mlp", "embed"), out_std, pdt)
        self.b_down = bias((d,), ("embed",), pdt)
        self.lora = Adapters({"w_up": (self.w_up, 1), "w_down": (self.w_down, 1)}, lora, rngs)

    def __call__(self, x: jax.Array, dropout_key=None) -> jax.Array:
        up = checkpoint_name(affine(self, "w_up", "b_up", "bte,em->btm", x, dropout_key), "mlp_up")
        hidden = constrain(gelu_tanh(up), ("batch", "length", "act_mlp"))  # [batch, length, mlp]
        down = affine(self, "w_down", "b_down", "btm,me->bte", hidden, dropout_key)
        return checkpoint_name(down, "mlp_down")


class Block(nnx.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, rngs: nnx.Rngs, kernel: AttentionKernel, lora: LoRASpec | None):
        pdt = dtype_of(config.param_dtype)
        self.attention_norm = LayerNorm(config.d_model, config.norm_eps, pdt)
        self.attention = Attention(config, rngs, kernel, lora)
        self.mlp_norm = LayerNorm(config.d_model, config.norm_eps, pdt)
        self.mlp = MLP(config, rngs, lora)

    def __call__(self, x: jax.Array, documents, cache=None, dropout_key=None):
        normed = checkpoint_name(self.attention_norm(x), "attention_norm")
        attended, cache = self.attention(normed, documents, cache, key_for(dropout_key, 0))
        x = x + attended
        transformed = self.mlp(checkpoint_name(self.mlp_norm(x), "mlp_norm"), key_for(dropout_key, 1))
        return constrain(x + transformed, ("batch", "length", "act_embed")), cache


class GPT2(nnx.Module):
    """GPT-2: token and position embeddings, the blocks (stacked on a leading `layers` axis and
    run with a scan, or unrolled with `scan_layers=False`), a final LayerNorm and the tied head."""

    def __init__(
        self,
        config: GPT2Config,
        rngs: nnx.Rngs,
        kernel: AttentionKernel = XLA_KERNEL,
        lora: LoRASpec | None = None,
    ):
        pdt = dtype_of(config.param_dtype)
        self.dtype = dtype_of(config.dtype)
        self.remat = (config.remat, tuple(config.remat_save), tuple(config.remat_offload))  # hashable: static
        self.kernel, self.scan_layers = kernel, config.scan_layers
        self.num_layers, self.num_heads, self.head_dim = config.num_layers, config.num_heads, config.head_dim
        self.context_length = config.context_length
        d = config.d_model
        self.embedding = param(rngs, (config.vocab_size, d), ("vocab", "embed"), config.init_std, pdt)
        self.position_embedding = param(
            rngs, (config.context_length, d), (None, "embed"), config.init_std, pdt
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs, kernel, lora)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = LayerNorm(d, config.norm_eps, pdt)

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
        tokens appended (None without one). positions pick the rows of the position table: they
        restart at 0 with each packed document. dropout_key: LoRA dropout's, in training. order:
        the original position of each position of rows laid out for context parallelism (no
        cache)."""
        # The model section cannot see data.seq_len: the rows' length is checked here, when the
        # step is traced (before it compiles), since rows past the position table have no positions.
        if cache is None and tokens.shape[1] > self.context_length:
            raise ConfigError(
                f"model.context_length={self.context_length} is shorter than rows of {tokens.shape[1]} "
                f"tokens (data.seq_len); set model.context_length to at least {tokens.shape[1]} or lower "
                "data.seq_len"
            )
        # Gather from tables replicated for the lookup (as FSDP gathers every weight before use).
        table = constrain(self.embedding[...], (None, "act_embed"))
        position_table = constrain(self.position_embedding[...], (None, "act_embed"))
        x = jnp.take(table, tokens, axis=0) + jnp.take(position_table, positions, axis=0, mode="clip")
        x = constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))  # [batch, length, embed]
        if cache is None:
            x = self._blocks(x, segment_ids, order, dropout_key)
        else:
            x, cache = self._blocks_with_cache(x, segment_ids, cache)
        hidden = self.final_norm(x)
        if return_hidden:
            return ModelOutput(hidden=hidden, cache=cache)
        logits = constrain(self.output_head().logits(hidden), ("batch", "length", "act_vocab"))
        return ModelOutput(logits=logits, cache=cache)

    def _blocks(self, x: jax.Array, segment_ids, order, dropout_key=None) -> jax.Array:
        documents = document_boundaries(self.kernel, segment_ids, order)
        if self.kernel.kind not in ("cudnn", "splash"):  # each context shard builds its queries' rows
            documents = constrain(documents, ("batch", None, "length", None))
        block_def, block_params = nnx.split(self.blocks)
        # One dropout key per layer, scanned with its parameters.
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)

        def apply_block(x, layer):
            layer_params, key = layer
            return nnx.merge(block_def, layer_params)(x, documents, dropout_key=key)[0], None

        apply_block = remat.checkpointed(apply_block, *self.remat)
        return over_layers(apply_block, x, (block_params, keys), self.scan_layers)[0]

    def _blocks_with_cache(self, x, segment_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The blocks over tokens that continue the cache's rows, writing their keys and values
        at slots [length, length + tokens) once, into the whole stack, after every layer has
        read the cache."""
        masks = cache_masks(segment_ids, cache.segment_ids, cache.length)
        block_def, block_params = nnx.split(self.blocks)

        def apply_block(x, layer):
            layer_params, keys, values = layer
            return nnx.merge(block_def, layer_params)(x, masks, (keys, values))

        read = (None, None) if cache.empty else (cache.keys, cache.values)
        x, (keys, values) = over_layers(apply_block, x, (block_params, *read), self.scan_layers)
        return x, cache.appended(keys, values, segment_ids)

    def output_head(self) -> OutputHead:
        """The transposed embedding [embed, vocab] in the compute dtype: GPT-2's head is tied."""
        return OutputHead(self.embedding[...].T.astype(self.dtype))

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty cache; under `parallel.activation_sharding` it is born sharded by
        `KVCache.logical_axes`."""
        shape = (self.num_layers, batch, self.num_heads, max_length, self.head_dim)
        axes = KVCache.logical_axes()
        return KVCache(
            keys=constrain(jnp.zeros(shape, self.dtype), axes.keys),
            values=constrain(jnp.zeros(shape, self.dtype), axes.values),
            segment_ids=constrain(jnp.zeros((batch, max_length), jnp.int32), axes.segment_ids),
            length=jnp.zeros((), jnp.int32),
            empty=True,
        )


def build(
    config: GPT2Config, rngs, kernel: AttentionKernel = XLA_KERNEL, lora: LoRASpec | None = None
) -> GPT2:
    return GPT2(config, rngs, kernel, lora)


def matmul_params(config: GPT2Config) -> int:
    """Parameters that take part in a matmul per token (the embedding lookups do not; the tied
    head does)."""
    d = config.d_model
    attention = 3 * d * d + d * d
    mlp = 2 * d * config.mlp_dim
    return config.num_layers * (attention + mlp) + d * config.vocab_size


def flops_per_token(config: GPT2Config, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6 per matmul parameter (4 when no weight gets a gradient: LoRA),
    plus attention scores and values over the whole row, 12·layers·d_model·seq_len; biases,
    norms and the position lookup left out, as in the usual 6N count."""
    attention = 12 * config.num_layers * config.d_model * seq_len
    return (4 if frozen_weights else 6) * matmul_params(config) + attention


# Never decayed: biases, LayerNorm scales and biases, and the position table.
NOT_DECAYED = ("bqkv", "bo", "b_up", "b_down", "scale", "bias", "position_embedding")


def decays(path: str, decay_embeddings: bool) -> bool:
    """Weight matrices decay; biases, norms and the position table never; the token embedding
    only with optim.decay_embeddings."""
    name = path.rsplit(".", 1)[-1]
    if name in NOT_DECAYED:
        return False
    return decay_embeddings or name != "embedding"


def traffic(config: GPT2Config) -> LayerTraffic:
    """Two all-reduces of the residual stream per block under tensor parallelism; under context
    parallelism each layer gathers every token's keys and values (d_model each)."""
    return LayerTraffic(tensor_reductions=2, context_gathered=2 * config.d_model)


# GPT-2's own logical axes → mesh axes: heads and the MLP's width split by tensor parallelism.
RULES = {
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "head_dim": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),  # keys and values of activations and of the KV cache
    "act_mlp": ("tensor",),
}

PROJECTIONS = (
    Projection("blocks.attention.wqkv", inputs=1),  # [embed | 3, heads, head_dim]
    Projection("blocks.attention.wo", inputs=2),  # [heads, head_dim | embed]
    Projection("blocks.mlp.w_up", inputs=1),  # [embed | mlp]
    Projection("blocks.mlp.w_down", inputs=1),  # [mlp | embed]
)


def _hf_key(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise UserError(f"config.json has no {key}, which a {ARCHITECTURE} needs; is it complete?")
    return hf[key]


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel → model keys of the gpt2 family."""
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise UserError(
            f"config.json has activation_function={activation}; jaxlm's GPT-2 MLP is GELU's tanh "
            f"approximation ({' or '.join(TANH_GELUS)})"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise UserError(
            "config.json scales attention by other than head_dim ** -0.5 (scale_attn_weights, "
            "scale_attn_by_inverse_layer_idx); jaxlm's GPT-2 scales by that alone"
        )
    if hf.get("tie_word_embeddings") is False:
        raise UserError("config.json has tie_word_embeddings=false; jaxlm's GPT-2 ties its head to wte")
    d_model = _hf_key(hf, "n_embd")
    return {
        "family": "gpt2",
        "vocab_size": _hf_key(hf, "vocab_size"),
        "d_model": d_model,
        "num_layers": _hf_key(hf, "n_layer"),
        "num_heads": _hf_key(hf, "n_head"),
        "mlp_dim": hf.get("n_inner") or 4 * d_model,
        "context_length": _hf_key(hf, "n_positions"),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": True,
    }


def config_to_hf(config: GPT2Config, context_length: int) -> dict[str, Any]:
    """The config.json transformers reads as this model (context_length: unused, GPT-2 has its own)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.d_model,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.mlp_dim,
        "n_positions": config.context_length,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
    }


def tensors(config: GPT2Config) -> list[HFTensor]:
    """Every parameter's tensor, as save_pretrained names them (under `transformer.`). Conv1D
    weights are stored [inputs, outputs], jaxlm's order: c_attn.weight [d, 3d] is wqkv viewed as
    (d, 3, heads, head_dim)."""
    d, h, hd, m, v = config.d_model, config.num_heads, config.head_dim, config.mlp_dim, config.vocab_size
    layer = "transformer.h.{layer}"

    def block(param: str, name: str, hf_shape, view=None) -> HFTensor:
        view = view or hf_shape
        identity = tuple(range(len(view)))
        return HFTensor(f"blocks.{param}", f"{layer}.{name}", hf_shape, view, identity, stacked=True)

    def whole(param: str, name: str, shape) -> HFTensor:
        return HFTensor(param, f"transformer.{name}", shape, shape, tuple(range(len(shape))), stacked=False)

    return [
        whole("embedding", "wte.weight", (v, d)),
        whole("position_embedding", "wpe.weight", (config.context_length, d)),
        block("attention_norm.scale", "ln_1.weight", (d,)),
        block("attention_norm.bias", "ln_1.bias", (d,)),
        block("attention.wqkv", "attn.c_attn.weight", (d, 3 * d), (d, 3, h, hd)),
        block("attention.bqkv", "attn.c_attn.bias", (3 * d,), (3, h, hd)),
        block("attention.wo", "attn.c_proj.weight", (d, d), (h, hd, d)),
        block("attention.bo", "attn.c_proj.bias", (d,)),
        block("mlp_norm.scale", "ln_2.weight", (d,)),
        block("mlp_norm.bias", "ln_2.bias", (d,)),
        block("mlp.w_up", "mlp.c_fc.weight", (d, m)),
        block("mlp.b_up", "mlp.c_fc.bias", (m,)),
        block("mlp.w_down", "mlp.c_proj.weight", (m, d)),
        block("mlp.b_down", "mlp.c_proj.bias", (d,)),
        whole("final_norm.scale", "ln_f.weight", (d,)),
        whole("final_norm.bias", "ln_f.bias", (d,)),
    ]


FAMILY = ModelFamily(
    name="gpt2",
    config=GPT2Config,
    build=build,
    flops_per_token=flops_per_token,
    decays=decays,
    hf=HuggingFace(
        architectures=(ARCHITECTURE,),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        tensors=tensors,
        optional_prefix="transformer.",
    ),
    projections=PROJECTIONS,
    lora_targets=("wqkv",),
    shape_keys=(
        "vocab_size",
        "d_model",
        "num_layers",
        "num_heads",
        "mlp_dim",
        "context_length",
        "tie_embeddings",
    ),
    rules=RULES,
    traffic=traffic,
    activations=(*remat.NORMS, *remat.ATTENTION, "mlp_up", "mlp_down"),
)
