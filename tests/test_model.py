"""The Llama family: every parameter names logical axes; remat, unrolling and chunked loss change
speed and memory, not results; dtypes; the KV cache gives the logits of the whole sequence; the
family's Hugging Face tensors; qkv biases and llama3 RoPE scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxlm.model import registry
from jaxlm.model.layers import Llama3RopeScaling
from jaxlm.training.step import _loss_fn


def build(config):
    return registry.family_of(config.model).build(config.model, nnx.Rngs(0))


def batch_of(config, rows=2):
    length = config.data.seq_len
    tokens = jax.random.randint(jax.random.key(0), (rows, length + 1), 0, 256)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.tile(jnp.arange(length), (rows, 1)),
        "segment_ids": jnp.ones((rows, length), jnp.int32),
        "loss_mask": jnp.ones((rows, length), jnp.int32),
    }


def loss_and_grads(config):
    graphdef, params = nnx.split(build(config), nnx.Param)
    params = nnx.to_pure_dict(params)

    def mean_loss(params):
        loss_sum, count, *_ = _loss_fn(graphdef, params, batch_of(config), config.train.loss_chunk)
        return loss_sum / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


def test_every_parameter_names_known_logical_axes(tmp_path):
    config = tiny_config(tmp_path)
    model = registry.abstract_model(config.model)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for spec, shape in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes), strict=True
    ):
        assert len(spec) == len(shape.shape)
        assert all(name in config.mesh.rules for name in spec)


@pytest.fixture(scope="module")
def float32_reference():
    return loss_and_grads(tiny_config("unused"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.remat=full"],
        ["model.remat=dots_no_batch"],
        ["model.scan_layers=false"],
        ["model.scan_layers=false", "model.remat=full"],
        ["train.loss_chunk=8"],  # cross-entropy a chunk of positions at a time
    ],
)
def test_how_the_step_runs_changes_neither_loss_nor_gradients(tmp_path, overrides, float32_reference):
    reference_loss, reference_grads = float32_reference
    loss, grads = loss_and_grads(tiny_config(tmp_path, *overrides))
    assert float(loss) == pytest.approx(float(reference_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_logits_are_the_hidden_state_times_the_output_projection(tmp_path):
    config = tiny_config(tmp_path)
    model = build(config)
    batch = batch_of(config)
    output = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    hidden = model(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True).hidden
    assert output.cache is None and output.hidden is None and output.aux_losses == {}
    head = model.output_head()
    assert head.softcap is None
    np.testing.assert_allclose(output.logits, hidden @ head.weight, rtol=1e-5, atol=1e-5)


def test_untrained_loss_is_near_uniform_and_bf16_compute_agrees(tmp_path, float32_reference):
    loss32, _ = float32_reference
    assert abs(float(loss32) - np.log(264)) < 0.1  # vocab_size 264 in the tiny config
    loss16, grads16 = loss_and_grads(tiny_config(tmp_path, "model.dtype=bfloat16"))
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))  # params stay float32


def test_tied_embeddings_have_no_output_projection(tmp_path):
    tied = build(tiny_config(tmp_path, "model.tie_embeddings=true"))
    untied = build(tiny_config(tmp_path))
    assert "lm_head" not in nnx.to_pure_dict(nnx.state(tied, nnx.Param))
    assert "lm_head" in nnx.to_pure_dict(nnx.state(untied, nnx.Param))
    loss, _ = loss_and_grads(tiny_config(tmp_path, "model.tie_embeddings=true"))
    assert np.isfinite(float(loss))


def test_a_trained_target_counts_only_where_the_loss_mask_is_set(tmp_path):
    config = tiny_config(tmp_path)
    graphdef, params = nnx.split(build(config), nnx.Param)
    batch = batch_of(config)
    half = batch["loss_mask"].at[:, ::2].set(0)
    _, count, *_ = _loss_fn(graphdef, params, batch)
    masked_sum, masked_count, *_ = _loss_fn(graphdef, params, {**batch, "loss_mask": half})
    assert float(count) == half.size and float(masked_count) == half.size / 2
    logits = build(config)(batch["tokens"], batch["positions"], batch["segment_ids"]).logits
    token_losses = (
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    )
    assert float(masked_sum) == pytest.approx(float(jnp.sum(token_losses[:, 1::2])), rel=1e-5)


@pytest.mark.parametrize("scan_layers", ["true", "false"])
def test_prefill_then_decoding_with_the_cache_gives_the_logits_of_the_whole_sequence(tmp_path, scan_layers):
    # Two rows, the second a packed row of two documents; 10 tokens prefilled into the new cache,
    # 2 more continuing it together (the second document starts at token 5), 4 decoded one by one.
    config = tiny_config(tmp_path, f"model.scan_layers={scan_layers}")
    model = build(config)
    length, prefill = 16, 12
    tokens = jax.random.randint(jax.random.key(3), (2, length), 0, 256)
    segment_ids = jnp.array([[1] * 16, [1] * 5 + [2] * 11])
    positions = jnp.array([list(range(16)), list(range(5)) + list(range(11))])
    whole = model(tokens, positions, segment_ids).logits

    cache = model.init_cache(batch=2, max_length=24)
    decoded = []
    for first, last in [(0, 10), (10, prefill), *((t, t + 1) for t in range(prefill, length))]:
        part = slice(first, last)
        output = model(tokens[:, part], positions[:, part], segment_ids[:, part], cache)
        decoded.append(output.logits)
        cache = output.cache
    assert int(cache.length) == length
    np.testing.assert_allclose(jnp.concatenate(decoded, axis=1), whole, rtol=1e-5, atol=1e-5)


def test_every_parameter_is_one_hugging_face_tensor_of_its_size(tmp_path):
    for overrides in ([], ["model.tie_embeddings=true"], ["model.qkv_bias=true", "model.head_dim=8"]):
        config = tiny_config(tmp_path, *overrides)
        params = nnx.to_pure_dict(nnx.state(registry.abstract_model(config.model), nnx.Param))
        shapes = {
            jax.tree_util.keystr(path, simple=True, separator="."): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        }
        tensors = registry.family_of(config.model).hf.tensors(config.model)
        assert sorted(tensor.param for tensor in tensors) == sorted(shapes)
        assert len({tensor.name for tensor in tensors}) == len(tensors)
        for tensor in tensors:
            assert tensor.stacked == ("{layer}" in tensor.name) == tensor.param.startswith("blocks.")
            one_layer = shapes[tensor.param][1:] if tensor.stacked else shapes[tensor.param]
            assert tuple(tensor.view[axis] for axis in tensor.order) == one_layer, tensor
            assert np.prod(tensor.view) == np.prod(tensor.hf_shape), tensor


def test_qkv_biases_are_zero_at_init_named_like_their_heads_and_never_decayed(tmp_path):
    config = tiny_config(tmp_path, "model.qkv_bias=true")
    model = build(config)
    attention = model.blocks.attention
    assert attention.bq[...].shape == (2, 4, 16) and attention.bk[...].shape == (2, 2, 16)
    assert not jnp.any(attention.bq[...]) and not jnp.any(attention.bv[...])
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert tuple(specs["blocks"]["attention"]["bk"]) == ("layers", "kv_heads", "head_dim")
    decays = registry.family_of(config.model).decays
    assert not any(decays(f"blocks.attention.{name}", True) for name in ("bq", "bk", "bv"))
    assert decays("blocks.attention.wq", False)


def test_biases_change_the_logits(tmp_path):
    config = tiny_config(tmp_path, "model.qkv_bias=true")
    model = build(config)
    batch = batch_of(config)
    before = model(batch["tokens"], batch["positions"], batch["segment_ids"]).logits
    model.blocks.attention.bk[...] = jnp.ones_like(model.blocks.attention.bk[...])
    after = model(batch["tokens"], batch["positions"], batch["segment_ids"]).logits
    assert float(jnp.abs(after - before).max()) > 1e-3


def test_llama3_rope_scaling_stretches_long_wavelengths_and_keeps_short_ones():
    scaling = Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=128
    )
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(16, dtype=jnp.float32) / 16))
    scaled = scaling(inv_freq)
    wavelength = 2 * np.pi / np.asarray(inv_freq)
    short, long = wavelength < 128 / 4, wavelength > 128 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_array_equal(scaled[short], inv_freq[short])
    np.testing.assert_allclose(scaled[long], inv_freq[long] / 8, rtol=1e-6)
    between = ~short & ~long
    assert np.all((scaled[between] < inv_freq[between]) & (scaled[between] > inv_freq[between] / 8))


def test_the_private_cudnn_attention_jaxlm_calls_still_has_its_packed_layout():
    # No public JAX API takes document offsets and lengths (jax.nn.dot_product_attention takes a
    # dense mask); jaxlm.model.layers.cudnn_attention uses the private one below. This fails when
    # JAX moves or changes it, before a GPU run would.
    import inspect

    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    parameters = inspect.signature(cudnn.dot_product_attention).parameters
    for name in ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type", "qkv_layout"):
        assert name in parameters, name
    assert cudnn.MaskType.PADDING_CAUSAL
