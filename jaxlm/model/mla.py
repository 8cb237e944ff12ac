"""Multi-head latent attention (DeepSeek-V2 and V3): keys and values come out of one small latent
per token, so a cache can hold that latent instead of every head's keys and values.

Per token x [embed]:
- queries: x·W_q, or through a low-rank bottleneck (`q_rank`) x·W_qa → RMSNorm → ·W_qb; each
  head's query is `nope_dim` channels without positions and `rope_dim` with them;
- the latent: x·W_kva gives `kv_rank` channels, RMSNormed (c), and `rope_dim` channels of one key
  shared by every head, which alone carry positions (k_pe);
- keys and values: c·W_kvb gives each head's `nope_dim` key channels and `v_dim` value channels;
  each head's key is those channels then k_pe.

Rotary positions rotate interleaved channel pairs (0, 1), (2, 3), ... and write the pairs' first
and second members as two halves, as DeepSeek's checkpoints (and transformers, rope_interleave)
lay them out. Scores are scaled by `scale` (DeepSeek-V3 multiplies (nope_dim + rope_dim)^-0.5 by
YaRN's mscale squared).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.model.layers import XLA_KERNEL, AttentionKernel, RMSNorm, param, xla_attention


@dataclass(frozen=True)
class MLASpec:
    heads: int
    kv_rank: int  # the latent's width (kv_lora_rank)
    nope_dim: int  # each head's key and query channels without positions (qk_nope_head_dim)
    rope_dim: int  # each head's key and query channels with positions (qk_rope_head_dim)
    v_dim: int  # each head's value width (v_head_dim)
    q_rank: int | None = None  # the queries' bottleneck (q_lora_rank); None: one projection
    scale: float | None = None  # scores' scale; None: (nope_dim + rope_dim) ** -0.5
    norm_eps: float = 1e-6

    @property
    def qk_dim(self) -> int:
        return self.nope_dim + self.rope_dim


def interleaved_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate the channel pairs (0, 1), (2, 3), ... of x [..., rope_dim] by `rotary_angles`
    ([..., rope_dim / 2]), written as the pairs' first members then their second."""
    x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MLA(nnx.Module):
    """Parameters: wq [embed, heads, qk] (or wq_a [embed, q_rank], q_norm, wq_b [q_rank, heads,
    qk]); wkv_a [embed, kv_rank + rope_dim]; kv_norm; wkv_b [kv_rank, heads, nope_dim + v_dim];
    wo [heads, v_dim, embed]."""

    def __init__(
        self,
        d_model: int,
        spec: MLASpec,
        rngs: nnx.Rngs,
        init_std: float,
        out_std: float,
        dtype,
        kernel: AttentionKernel = XLA_KERNEL,
    ):
        h, qk = spec.heads, spec.qk_dim
        self.spec, self.kernel = spec, kernel
        if spec.q_rank is None:
            self.wq = param(rngs, (d_model, h, qk), ("embed", "heads", "head_dim"), init_std, dtype)
        else:
            self.wq_a = param(rngs, (d_model, spec.q_rank), ("embed", "q_rank"), init_std, dtype)
            self.q_norm = RMSNorm(spec.q_rank, spec.norm_eps, dtype, axis="q_rank")
            self.wq_b = param(rngs, (spec.q_rank, h, qk), ("q_rank", "heads", "head_dim"), init_std, dtype)
        latent = spec.kv_rank + spec.rope_dim
        self.wkv_a = param(rngs, (d_model, latent), ("embed", "kv_rank"), init_std, dtype)
        self.kv_norm = RMSNorm(spec.kv_rank, spec.norm_eps, dtype, axis="kv_rank")
        self.wkv_b = param(
            rngs,
            (spec.kv_rank, h, spec.nope_dim + spec.v_dim),
            ("kv_rank", "heads", "head_dim"),
            init_std,
            dtype,
        )
        self.wo = param(rngs, (h, spec.v_dim, d_model), ("heads", "head_dim", "embed"), out_std, dtype)

    def queries(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        """x [batch, length, embed] → queries [batch, length, heads, qk], positions applied and
        the scale folded in (the attention einsums scale by qk ** -0.5 themselves)."""
        spec, dt = self.spec, x.dtype
        if hasattr(self, "wq"):
            q = jnp.einsum("bte,ehd->bthd", x, self.wq[...].astype(dt))
        else:
            bottleneck = self.q_norm(x @ self.wq_a[...].astype(dt))
            q = jnp.einsum("btr,rhd->bthd", bottleneck, self.wq_b[...].astype(dt))
        q = jnp.concatenate(
            [q[..., : spec.nope_dim], interleaved_rotary(q[..., spec.nope_dim :], sin, cos)], -1
        )
        if spec.scale is not None:
            q = q * jnp.asarray(spec.scale * spec.qk_dim**0.5, dt)
        return q

    def latent(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [batch, length, embed] → (the normed latent c [batch, length, kv_rank], the shared
        positional key k_pe [batch, length, rope_dim]): what a compressed cache holds."""
        spec = self.spec
        kv = x @ self.wkv_a[...].astype(x.dtype)
        k_pe = interleaved_rotary(kv[..., None, spec.kv_rank :], sin, cos)[:, :, 0]
        return self.kv_norm(kv[..., : spec.kv_rank]), k_pe

    def keys_values(self, latent: jax.Array, k_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The latent and positional key [batch, length, ...] → every head's keys [batch, length,
        heads, qk] and values [batch, length, heads, v_dim]."""
        spec = self.spec
        kv = jnp.einsum("btr,rhd->bthd", latent, self.wkv_b[...].astype(latent.dtype))
        k_nope, v = kv[..., : spec.nope_dim], kv[..., spec.nope_dim :]
        k_pe = jnp.broadcast_to(k_pe[:, :, None], (*k_nope.shape[:3], spec.rope_dim))
        return jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1), v

    def __call__(self, x: jax.Array, rope, documents, cache=None, dropout_key=None):
        """x [batch, length, embed]; rope: `rotary_angles` (sin, cos) of rope_dim; documents:
        `attention_mask` [batch, 1, length, length], or with a cache its `cache_masks`. cache:
        this layer's compressed cache (the latents [batch, 1, max_length, kv_rank] and positional
        keys [batch, 1, max_length, rope_dim], `KVCache`'s keys and values), read only; None each
        for an empty one. Returns the output [batch, length, embed] and, with a cache, x's latents
        and positional keys [batch, length, 1, ...] for the caller to write."""
        del dropout_key  # no adapters on latent attention (yet)
        q = self.queries(x, *rope)
        latent, k_pe = self.latent(x, *rope)
        if cache is None:
            k, v = self.keys_values(latent, k_pe)
            if self.kernel.kind == "splash":  # its values as wide as its keys: zeros appended, cut off after
                padded = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, self.spec.qk_dim - self.spec.v_dim)))
                blocks = self.kernel.splash_block_q, self.kernel.splash_block_kv, self.kernel.splash_interpret
                out = documents.attend(q, k, padded, *blocks)[..., : self.spec.v_dim]  # splash.Documents
            else:
                out = xla_attention(q, k, v, documents)  # [batch, length, heads, v_dim]
        else:
            out = self._absorbed(q, latent, k_pe, cache, documents)
            cache = (latent[:, :, None], k_pe[:, :, None])
        return jnp.einsum("bthd,hde->bte", out, self.wo[...].astype(x.dtype)), cache

    def _absorbed(self, q, latent, k_pe, cache, masks) -> jax.Array:
        """Attention of new tokens over the compressed cache and themselves, without expanding
        the cache into keys and values: W_kvb's key part folds into the queries (scores against
        the latents), its value part is applied after the weighted sum of latents. Per cached
        token it reads kv_rank + rope_dim numbers, not heads × (qk + v_dim)."""
        spec, dt = self.spec, q.dtype
        w = self.wkv_b[...].astype(dt)
        w_k, w_v = w[..., : spec.nope_dim], w[..., spec.nope_dim :]  # [kv_rank, heads, ...]
        q = q * jnp.asarray(spec.qk_dim**-0.5, dt)
        q_latent = jnp.einsum("bthn,rhn->bthr", q[..., : spec.nope_dim], w_k)
        q_pe = q[..., spec.nope_dim :]
        cached_latent, cached_pe = cache
        in_cache, in_new = masks
        if cached_latent is None:
            latents, pes, mask = latent, k_pe, in_new
        else:
            latents = jnp.concatenate([cached_latent[:, 0].astype(dt), latent], axis=1)
            pes = jnp.concatenate([cached_pe[:, 0].astype(dt), k_pe], axis=1)
            mask = jnp.concatenate([in_cache, in_new], axis=-1)
        scores = jnp.einsum("bthr,bsr->bhts", q_latent, latents, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthp,bsp->bhts", q_pe, pes, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        return jnp.einsum("bhts,bsr,rhv->bthv", probs, latents, w_v)
