"""The model: every parameter names logical axes; remat, unrolling and chunked loss change
speed and memory, not results; dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxlm.config import DEFAULT_RULES
from jaxlm.model import Transformer
from jaxlm.step import _loss_fn


def batch_of(config, rows=2):
    length = config.data.seq_len
    tokens = jax.random.randint(jax.random.key(0), (rows, length + 1), 0, 256)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": jnp.ones((rows, length), jnp.int32),
        "positions": jnp.tile(jnp.arange(length), (rows, 1)),
    }


def loss_and_grads(config):
    model = Transformer(config.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    def mean_loss(params):
        loss_sum, count = _loss_fn(graphdef, params, batch_of(config), config.train.loss_chunk)
        return loss_sum / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


def test_every_parameter_names_known_logical_axes(tmp_path):
    model = nnx.eval_shape(lambda: Transformer(tiny_config(tmp_path).model, nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for spec, shape in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes), strict=True
    ):
        assert len(spec) == len(shape.shape)
        assert all(name in DEFAULT_RULES for name in spec)


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
    model = Transformer(config.model, nnx.Rngs(0))
    batch = batch_of(config)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    np.testing.assert_allclose(logits, hidden @ model.output_projection(), rtol=1e-5, atol=1e-5)


def test_untrained_loss_is_near_uniform_and_bf16_compute_agrees(tmp_path, float32_reference):
    loss32, _ = float32_reference
    assert abs(float(loss32) - np.log(264)) < 0.1  # vocab_size 264 in the tiny config
    loss16, grads16 = loss_and_grads(tiny_config(tmp_path, "model.dtype=bfloat16"))
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))  # params stay float32


def test_tied_embeddings_have_no_output_projection(tmp_path):
    tied = Transformer(tiny_config(tmp_path, "model.tie_embeddings=true").model, nnx.Rngs(0))
    untied = Transformer(tiny_config(tmp_path).model, nnx.Rngs(0))
    assert "lm_head" not in nnx.to_pure_dict(nnx.state(tied, nnx.Param))
    assert "lm_head" in nnx.to_pure_dict(nnx.state(untied, nnx.Param))
    loss, _ = loss_and_grads(tiny_config(tmp_path, "model.tie_embeddings=true"))
    assert np.isfinite(float(loss))
