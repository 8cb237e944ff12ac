"""Building blocks that model families share: parameters with logical axes, RMSNorm, rotary
positions, attention kernels and masks (packed documents, KV caches), layer stacking and remat.

Every parameter names its logical axes (`embed`, `heads`, ...); nothing here knows about
devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import AttentionConfig
from jaxlm.model import splash


@dataclass(frozen=True)
class AttentionKernel:
    """How a model's attention runs in training and evaluation: the config's `attention` section
    resolved for the devices (`jaxlm.training.setup.resolve_attention`). A cache always takes the XLA
    einsums."""

    kind: str = "xla"  # xla, cudnn or splash
    splash_block_q: int | None = None
    splash_block_kv: int | None = None
    splash_interpret: bool = False
    max_documents: int = 8  # cuDNN's document slots per packed row

    @classmethod
    def of(cls, attention: AttentionConfig, kind: str) -> AttentionKernel:
        """The `attention` section's settings for the kernel `kind` (xla, cudnn or splash)."""
        return cls(
            kind,
            attention.splash_block_q,
            attention.splash_block_kv,
            attention.splash_interpret,
            attention.max_documents,
        )


XLA_KERNEL = AttentionKernel()  # what a model built without a resolved config runs


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    logical_axes: Sequence[str],
    std: float,
    dtype: jnp.dtype,
) -> nnx.Param:
    """A normal-initialised parameter that carries its logical axis names."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (or, with a tuple `dim`, the last axes together: OLMoE's norm of
    all heads' queries), scaled by w, or by 1 + w with `plus_one` (Gemma's, w born 0)."""

    def __init__(
        self,
        dim: int | tuple[int, ...],
        eps: float,
        param_dtype: jnp.dtype,
        plus_one: bool = False,
        axis: str | tuple[str, ...] = "embed",
    ):
        self.eps, self.plus_one = eps, plus_one
        shape, axes = (dim, axis) if isinstance(dim, tuple) else ((dim,), (axis,))
        self.over = tuple(range(-len(shape), 0))
        initial = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(initial(shape, param_dtype), out_sharding=axes, eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 whatever the compute dtype: bf16 mean-of-squares loses too much.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=self.over, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (normed * (1 + scale if self.plus_one else scale)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with a scale and a bias (GPT-2's, BERT's), in float32."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, axis: str = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis,), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis,), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
            x.dtype
        )


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's stretch of the rotary frequencies to a longer context: wavelengths longer than
    original_max_positions / low_freq_factor are divided by `factor`, those shorter than
    original_max_positions / high_freq_factor are kept, and the ones between are interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int

    def __call__(self, inv_freq: jax.Array) -> jax.Array:
        wavelength = 2 * jnp.pi / inv_freq
        original = self.original_max_positions
        smooth = (original / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        interpolated = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        stretched = jnp.where(
            wavelength > original / self.low_freq_factor, inv_freq / self.factor, interpolated
        )
        return jnp.where(wavelength < original / self.high_freq_factor, inv_freq, stretched)


@dataclass(frozen=True)
class LinearRopeScaling:
    """Positions interpolated by `factor` (every frequency divided by it): Gemma 3's global layers."""

    factor: float

    def __call__(self, inv_freq: jax.Array) -> jax.Array:
        return inv_freq / self.factor


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN's stretch (DeepSeek-V3's rope_scaling): frequencies that turn fewer than `beta_slow`
    times over the original context are divided by `factor`, those that turn more than
    `beta_fast` times are kept, and a linear ramp over the channels between blends the two.
    `theta` is the base the frequencies came from (the ramp's bounds depend on it)."""

    factor: float
    original_max_positions: int
    theta: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __call__(self, inv_freq: jax.Array) -> jax.Array:
        half = inv_freq.shape[0]

        def channel(rotations: float) -> float:  # the channel whose frequency turns `rotations` times
            return (
                2
                * half
                * math.log(self.original_max_positions / (rotations * 2 * math.pi))
                / (2 * math.log(self.theta))
            )

        low, high = channel(self.beta_fast), channel(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, 2 * half - 1)
        ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / ((high - low) or 0.001), 0, 1)
        return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


FrequencyScaling = Llama3RopeScaling | LinearRopeScaling | YarnRopeScaling


def rotary_angles(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    table_length: int,
    scaling: FrequencyScaling | None = None,
) -> tuple[jax.Array, jax.Array]:
    """sin and cos of each position's rotation angles, [batch, length, 1, head_dim / 2] float32.

    Looked up by position in tables over 0..table_length-1 (the row length in training, where
    positions restart per document; the cache's length in generation), which depend only on
    shapes: XLA folds them at compile time, so a step computes no sin or cos."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))  # [half]
    if scaling is not None:
        inv_freq = scaling(inv_freq)
    angles = jnp.arange(table_length, dtype=jnp.float32)[:, None] * inv_freq  # [table_length, half]

    def lookup(table: jax.Array) -> jax.Array:
        return jnp.take(table, positions, axis=0, mode="clip")[:, :, None, :]

    return lookup(jnp.sin(angles)), lookup(jnp.cos(angles))


def rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate pairs of channels of x [batch, length, heads, head_dim] by `rotary_angles`."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_mask(
    segment_ids: jax.Array, order: np.ndarray | None = None, window: int | None = None
) -> jax.Array:
    """[batch, 1, length, length] bool: causal, and never across documents of a packed row; with
    a `window`, a query sees only the `window` positions up to its own (itself included).

    order: None for a row in its own order, else each position's original position in a row laid
    out for context parallelism (`parallel.load_balanced_order`): causal in those."""
    length = segment_ids.shape[1]
    original = jnp.arange(length) if order is None else jnp.asarray(order, jnp.int32)  # [length]
    causal = _seen(original[:, None], original[None, :], window)
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_document)[:, None]


def _seen(query: jax.Array, key: jax.Array, window: int | None) -> jax.Array:
    """Whether a query at position `query` sees the key at `key` (broadcast): at or before it, and
    within `window` of it."""
    seen = key <= query
    return seen if window is None else seen & (query - key < window)


def cache_masks(
    segment_ids: jax.Array, cache_segment_ids: jax.Array, start: jax.Array, window: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Which keys each of `length` new tokens, to be written at cache slots [start, start +
    length), attends to: [batch, 1, length, max_length] bool over the cache's slots before
    `start`, and [batch, 1, length, length] over the new tokens themselves (up to its own), both
    within its own document and, with a `window`, within `window` slots of its own.

    segment_ids: [batch, length] of the new tokens; cache_segment_ids: [batch, max_length] of the
    cache before they are written (0 in empty slots, which no document matches)."""
    length, max_length = segment_ids.shape[1], cache_segment_ids.shape[1]
    slots = start + jnp.arange(length)  # [length]: where the new tokens go
    earlier = _seen(slots[:, None], jnp.arange(max_length)[None, :], window) & (
        jnp.arange(max_length) < start
    )  # [length, max_length]
    in_cache = earlier[None] & (segment_ids[:, :, None] == cache_segment_ids[:, None, :])
    causal = _seen(jnp.arange(length)[:, None], jnp.arange(length)[None, :], window)
    in_new = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return in_cache[:, None], in_new[:, None]


def document_spans(segment_ids: jax.Array, max_documents: int) -> tuple[jax.Array, jax.Array]:
    """Where each document of each packed row starts and how long it is, the layout cuDNN's
    packed (ragged) attention takes: offsets [batch, max_documents + 1] and lengths [batch,
    max_documents] int32, -1 past a row's last document.

    A document is a run of equal segment ids. A row with more than `max_documents` documents
    has its last ones merged into its max_documents-th (attention stays causal)."""
    batch, length = segment_ids.shape
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    first = jax.vmap(lambda row: jnp.nonzero(row, size=max_documents, fill_value=length)[0])(starts)
    first = first.astype(jnp.int32)  # [batch, max_documents]; `length` where there is none
    end = jnp.concatenate([first[:, 1:], jnp.full((batch, 1), length, jnp.int32)], axis=1)
    present = first < length
    lengths = jnp.where(present, end - first, -1)
    offsets = jnp.concatenate([jnp.where(present, first, -1), jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    return offsets, lengths


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, spans: tuple[jax.Array, jax.Array]
) -> jax.Array:
    """cuDNN's fused (flash) attention, causal within each packed document: q [batch, length,
    heads, head_dim], k and v [batch, length, kv_heads, head_dim], spans `document_spans` → like q.

    jax.nn.dot_product_attention takes document boundaries only as a dense mask, which cuDNN
    turns into a [batch, 1, length, length] bias (read, and differentiated, at every step, with
    no causal skipping); the packed layout it uses underneath takes the boundaries directly."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # no public packed-layout API

    offsets, lengths = spans
    return cudnn.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=lengths,
        kv_seqlen=lengths,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5,
        mask_type=cudnn.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )


def runs_cudnn_attention(device: jax.Device) -> bool:
    """Whether `device` runs cuDNN's packed flash attention: an NVIDIA GPU of compute
    capability 9.0 (Hopper) or newer."""
    try:
        capability = float(getattr(device, "compute_capability", 0) or 0)
    except ValueError:
        capability = 0.0
    return device.platform == "gpu" and capability >= 9.0


def attention_kernel(setting: str, device: jax.Device) -> str:
    """The kernel attention.kernel picks for a mesh of `device`s: auto is splash on TPU, cudnn
    where `runs_cudnn_attention`, jaxlm's XLA einsums anywhere else (CPU, older GPUs).
    `jaxlm.training.setup.build_model` resolves it (XLA for rows splash's blocks do not cut); a model
    built with auto itself runs the XLA einsums."""
    if setting != "auto":
        return setting
    if device.platform == "tpu":
        return "splash"
    return "cudnn" if runs_cudnn_attention(device) else "xla"


def document_boundaries(
    kernel: AttentionKernel,
    segment_ids: jax.Array,
    order: np.ndarray | None = None,
    window: int | None = None,
):
    """What attention needs to keep packed documents apart, built once per step for the layers
    of one kind: `document_spans` for the cudnn kernel, `splash.Documents` for splash (its kernel
    takes the segment ids, `order` and window as they are), else `attention_mask`. order, window: as
    `attention_mask`'s (cuDNN's here has no window: `jaxlm.training.setup` gives it none)."""
    if window is not None and kernel.kind == "cudnn":
        raise ValueError("the cudnn kernel has no sliding window")
    if kernel.kind == "cudnn":
        if order is not None:
            raise ValueError("cuDNN's packed attention takes rows in their own order only")
        return document_spans(segment_ids, kernel.max_documents)
    if kernel.kind == "splash":
        key = None if order is None else np.asarray(order, np.int32).tobytes()
        return splash.Documents(segment_ids, 0, key, (window,))
    return attention_mask(segment_ids, order, window)


def soft_cap(scores: jax.Array, cap: float | None) -> jax.Array:
    """cap · tanh(scores / cap): scores bounded by ±cap (Gemma 2's attention), or as they are."""
    return scores if cap is None else cap * jnp.tanh(scores / cap)


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, softcap: float | None = None
) -> jax.Array:
    """Grouped-query attention in plain einsums: q [batch, length, heads, head_dim], k and v
    [batch, kv_length, kv_heads, head_dim], mask [batch, 1, length, kv_length] → like q; scores
    soft-capped at `softcap` if given.

    The same computation as jax.nn.dot_product_attention's XLA path, with the scale applied to
    q (length × head_dim values) rather than to the scores (length × length)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = (q * jnp.asarray(head_dim**-0.5, q.dtype)).reshape(
        batch, length, kv_heads, heads // kv_heads, head_dim
    )
    scores = soft_cap(jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32), softcap)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, heads, v.shape[-1])  # values may be narrower than keys (MLA)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    masks: tuple[jax.Array, jax.Array],
    softcap: float | None = None,
) -> jax.Array:
    """`xla_attention` of new tokens over a cache's earlier slots and themselves, without writing
    them into the cache first: q [batch, length, heads, head_dim], their k and v [batch, length,
    kv_heads, head_dim], the cache's keys and values [batch, kv_heads, max_length, head_dim] (each
    head's slots one run, as the einsums read them), `cache_masks` → like q.

    The cache is only read (one softmax over both parts' scores), so a decode step moves it once,
    and the caller writes the new slots into the whole stacked cache in place."""
    batch, length, heads, head_dim = q.shape
    kv_heads, slots = k.shape[2], keys.shape[2]
    q = (q * jnp.asarray(head_dim**-0.5, q.dtype)).reshape(
        batch, length, kv_heads, heads // kv_heads, head_dim
    )
    in_cache, in_new = masks
    lowest = jnp.finfo(jnp.float32).min
    cached = soft_cap(jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32), softcap)
    new = soft_cap(jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32), softcap)
    scores = jnp.concatenate(
        [jnp.where(in_cache[:, :, None], cached, lowest), jnp.where(in_new[:, :, None], new, lowest)], axis=-1
    )
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs[..., :slots], values)
    out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., slots:], v)
    return out.reshape(batch, length, heads, head_dim)


def unstack(stacked):
    """The per-layer parameter trees of a tree of [layers, ...] arrays. One split per array (its
    gradient is one concatenate), not a slice per layer (whose gradients are zero-padded to the
    full stack and summed)."""
    leaves, treedef = jax.tree.flatten(stacked)
    layers = leaves[0].shape[0]
    per_leaf = [[part[0] for part in jax.lax.split(leaf, [1] * layers)] for leaf in leaves]
    return [jax.tree.unflatten(treedef, [parts[i] for parts in per_leaf]) for i in range(layers)]


def over_layers(apply_layer, x: jax.Array, layers: tuple, scan: bool):
    """x through every layer: `apply_layer(x, layer) -> (x, written)`, where `layer` holds one
    layer's part of each entry of `layers`: a tree stacked on a leading layers axis (parameters,
    dropout keys, a cache), a list of one Python value per layer (each layer's kind), or None
    (None for every layer). With `scan`, one `lax.scan` (the lists become arrays); else unrolled.
    Returns x and what the layers wrote, stacked on a leading layers axis (None for nothing)."""
    if scan:
        return jax.lax.scan(
            apply_layer, x, tuple(jnp.asarray(part) if isinstance(part, list) else part for part in layers)
        )
    count = next(
        len(part) if isinstance(part, list) else jax.tree.leaves(part)[0].shape[0]
        for part in layers
        if part is not None
    )
    per_layer = [
        [None] * count if part is None else part if isinstance(part, list) else unstack(part)
        for part in layers
    ]
    written = []
    for layer in zip(*per_layer, strict=True):
        x, out = apply_layer(x, layer)
        written.append(out)
    stacked = None if written[0] is None else jax.tree.map(lambda *parts: jnp.stack(parts), *written)
    return x, stacked
