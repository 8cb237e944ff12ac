"""Multi-head latent attention (model/mla.py) against transformers' DeepseekV3Attention on random
weights (tests/fixtures/mla, made by make_fixture.py): queries through one projection and through
a bottleneck, interleaved rotary channels, YaRN's frequencies and its mscale in the scale."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx

from jaxlm.model import splash
from jaxlm.model.layers import (
    AttentionKernel,
    YarnRopeScaling,
    attention_mask,
    cache_masks,
    rotary_angles,
    yarn_mscale,
)
from jaxlm.model.mla import MLA, MLASpec

FIXTURES = REPO / "tests/fixtures/mla"
HEADS, KV_RANK, NOPE, ROPE, V = 4, 16, 16, 8, 12
YARN = YarnRopeScaling(factor=4.0, original_max_positions=16, theta=10000.0)


def spec_of(name: str) -> MLASpec:
    q_rank = None if name == "mla_q_full" else 24
    scale = (NOPE + ROPE) ** -0.5 * (1 if q_rank is None else yarn_mscale(4.0, 1.0) ** 2)
    return MLASpec(HEADS, KV_RANK, NOPE, ROPE, V, q_rank=q_rank, scale=scale)


def load(name: str) -> tuple[MLA, dict]:
    """The fixture's layer as jaxlm's: transformers' [out, in] matrices split into heads."""
    fixture = dict(np.load(FIXTURES / f"{name}.npz"))
    weight = {
        key.removeprefix("weight/").removesuffix(".weight"): value
        for key, value in fixture.items()
        if key.startswith("weight/")
    }
    spec = spec_of(name)
    layer = MLA(64, spec, nnx.Rngs(0), 0.02, 0.02, jnp.float32)
    if spec.q_rank is None:
        layer.wq[...] = weight["q_proj"].T.reshape(64, HEADS, NOPE + ROPE)
    else:
        layer.wq_a[...] = weight["q_a_proj"].T
        layer.q_norm.scale[...] = weight["q_a_layernorm"]
        layer.wq_b[...] = weight["q_b_proj"].T.reshape(spec.q_rank, HEADS, NOPE + ROPE)
    layer.wkv_a[...] = weight["kv_a_proj_with_mqa"].T
    layer.kv_norm.scale[...] = weight["kv_a_layernorm"]
    layer.wkv_b[...] = weight["kv_b_proj"].T.reshape(KV_RANK, HEADS, NOPE + V)
    layer.wo[...] = weight["o_proj"].T.reshape(HEADS, V, 64)
    return layer, fixture


@pytest.mark.parametrize("name", ["mla_q_full", "mla_q_rank"])
def test_latent_attention_computes_transformers_deepseek_v3_attention(name):
    layer, fixture = load(name)
    spec = layer.spec
    assert abs(spec.scale - float(fixture["scaling"])) < 1e-12
    x = jnp.asarray(fixture["x"])
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    scaling = None if spec.q_rank is None else YARN
    rope = rotary_angles(positions, ROPE, 10000.0, x.shape[1], scaling)
    if scaling is not None:  # YaRN's frequencies, as transformers computes them
        inv_freq = scaling(1.0 / (10000.0 ** (jnp.arange(ROPE // 2, dtype=jnp.float32) / (ROPE // 2))))
        np.testing.assert_allclose(inv_freq, fixture["inv_freq"], rtol=1e-6)
        assert float(fixture["attention_scaling"]) == 1.0  # mscale = mscale_all_dim: cos and sin unscaled
    mask = attention_mask(jnp.ones(x.shape[:2], jnp.int32))
    out, _ = layer(x, rope, mask)
    expected = fixture["out"]
    assert float(jnp.max(jnp.abs(out - expected))) <= 1e-5 * float(np.abs(expected).max()) + 1e-6


def test_keys_and_values_come_out_of_the_latent_alone():
    """What a compressed cache holds (the latent and the shared positional key: kv_rank +
    rope_dim per token) gives every head's keys and values."""
    layer, fixture = load("mla_q_full")
    x = jnp.asarray(fixture["x"])
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    rope = rotary_angles(positions, ROPE, 10000.0, x.shape[1])
    latent, k_pe = layer.latent(x, *rope)
    assert latent.shape[-1] + k_pe.shape[-1] == KV_RANK + ROPE  # 24 per token, for 4 heads' 28 + 12
    k, v = layer.keys_values(latent, k_pe)
    assert k.shape == (*x.shape[:2], HEADS, NOPE + ROPE) and v.shape == (*x.shape[:2], HEADS, V)
    np.testing.assert_array_equal(k[:, :, 0, NOPE:], k[:, :, 3, NOPE:])  # one positional key for all heads


def test_the_compressed_cache_attends_as_the_expanded_keys_and_values_do():
    """A prompt's first 16 tokens into an empty cache, then 8 more over it: the absorbed
    attention over latents gives the layer's output on all 24 at once."""
    layer, fixture = load("mla_q_rank")
    x = jnp.asarray(fixture["x"])
    batch, length = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    rope = rotary_angles(positions, ROPE, 10000.0, length, YARN)
    whole, _ = layer(x, rope, attention_mask(jnp.ones((batch, length), jnp.int32)))
    first, rest = slice(0, 16), slice(16, length)
    empty = jnp.zeros((batch, length), jnp.int32)
    masks = cache_masks(jnp.ones((batch, 16), jnp.int32), empty, jnp.asarray(0))
    head, (latent, k_pe) = layer(x[:, first], tuple(r[:, first] for r in rope), masks, (None, None))
    cache_segments = empty.at[:, :16].set(1)
    slots = jnp.zeros((batch, 1, length, KV_RANK)).at[:, 0, :16].set(latent[:, :, 0])
    pe_slots = jnp.zeros((batch, 1, length, ROPE)).at[:, 0, :16].set(k_pe[:, :, 0])
    masks = cache_masks(jnp.ones((batch, 8), jnp.int32), cache_segments, jnp.asarray(16))
    tail, _ = layer(x[:, rest], tuple(r[:, rest] for r in rope), masks, (slots, pe_slots))
    np.testing.assert_allclose(jnp.concatenate([head, tail], axis=1), whole, atol=2e-6, rtol=1e-5)


def test_on_splash_the_values_are_padded_to_the_keys_width_and_cut_back():
    """Splash wants values as wide as the keys (28 here, 12 of values): zeros appended, output
    cut back; the layer then gives XLA's output (Pallas interpret mode)."""
    layer, fixture = load("mla_q_rank")
    x = jnp.asarray(fixture["x"])
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    rope = rotary_angles(positions, ROPE, 10000.0, x.shape[1], YARN)
    segments = jnp.ones(x.shape[:2], jnp.int32)
    xla, _ = layer(x, rope, attention_mask(segments))
    layer.kernel = AttentionKernel("splash", splash_interpret=True)
    kernel, _ = layer(x, rope, splash.Documents(segments, 0, None, (None,)))
    np.testing.assert_allclose(kernel, xla, atol=2e-6, rtol=1e-5)
