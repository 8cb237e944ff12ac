"""The decoder-only language model: embed → scanned blocks → norm → logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model.layers import (
    MLP,
    Attention,
    RMSNorm,
    document_boundaries,
    dtype_of,
    param,
    rotary_angles,
)
from jaxlm.parallel import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        pdt = dtype_of(config.param_dtype)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps, pdt)
        self.attention = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, pdt)
        self.mlp = MLP(config, rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], documents) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), rope, documents)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "act_embed"))


class Transformer(nnx.Module):
    """Llama-style causal LM. Blocks are stacked on a leading `layers` axis and run with a scan,
    so compile time does not grow with depth; with `scan_layers=False` the same stacked
    parameters are applied layer by layer, unrolled (faster steps on CPU, slower compiles)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        pdt = dtype_of(config.param_dtype)
        self.dtype = dtype_of(config.dtype)
        self.remat = config.remat
        self.attention, self.max_documents = config.attention, config.max_documents
        self.scan_layers = config.scan_layers
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.tie_embeddings = config.tie_embeddings
        self.embedding = param(
            rngs, (config.vocab_size, config.d_model), ("vocab", "embed"), config.init_std, pdt
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, pdt)
        if not config.tie_embeddings:
            self.lm_head = param(
                rngs, (config.d_model, config.vocab_size), ("embed", "vocab"), config.init_std, pdt
            )

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """tokens, positions, segment_ids: [batch, length] int32 → logits [batch, length, vocab]."""
        logits = jnp.einsum(
            "bte,ev->btv", self.hidden(tokens, positions, segment_ids), self.output_projection()
        )
        return constrain(logits, ("batch", "length", "act_vocab"))

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """The final normed residual stream [batch, length, embed], before the output projection."""
        # Gather from a table replicated for the lookup (as FSDP gathers every weight before use);
        # a gather from a vocab- and embed-sharded table cannot be partitioned without copies.
        table = constrain(self.embedding[...], (None, "act_embed"))
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)  # [batch, length, embed]
        x = constrain(x, ("batch", "length", "act_embed"))

        # What every layer shares is computed once, outside the layers.
        rope = rotary_angles(positions, self.head_dim, self.rope_theta)
        documents = document_boundaries(self.attention, self.max_documents, segment_ids)
        block_def, block_params = nnx.split(self.blocks)

        def apply_block(x, layer_params):
            return nnx.merge(block_def, layer_params)(x, rope, documents), None

        if self.remat != "none":
            apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        if self.scan_layers:
            x, _ = jax.lax.scan(apply_block, x, block_params)
        else:
            for layer_params in _unstack(block_params):
                x, _ = apply_block(x, layer_params)
        return self.final_norm(x)

    def output_projection(self) -> jax.Array:
        """[embed, vocab] in the compute dtype: the LM head, or the transposed embedding if tied."""
        weight = self.embedding[...].T if self.tie_embeddings else self.lm_head[...]
        return weight.astype(self.dtype)


def _unstack(stacked):
    """The per-layer parameter trees of a tree of [layers, ...] arrays. One split per array (its
    gradient is one concatenate), not a slice per layer (whose gradients are zero-padded to the
    full stack and summed)."""
    leaves, treedef = jax.tree.flatten(stacked)
    layers = leaves[0].shape[0]
    per_leaf = [[part[0] for part in jax.lax.split(leaf, [1] * layers)] for leaf in leaves]
    return [jax.tree.unflatten(treedef, [parts[i] for parts in per_leaf]) for i in range(layers)]
