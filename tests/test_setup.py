"""The set-up apart from the loop: a params-only set-up for inference and evaluation builds the
same parameters, on the same shardings, as training's, without an optimizer."""

import jax
import numpy as np
from conftest import tiny_config

from jaxlm.data import pipeline
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.training.setup import build_model, build_train, jit_eval_step


def test_the_params_only_setup_builds_trainings_parameters_on_the_same_shardings(tmp_path):
    config = tiny_config(tmp_path, "mesh.fsdp=4", "mesh.tensor=2")
    model, training = build_model(config), build_train(config)
    params = model.init_params(jax.random.key(config.train.seed))
    state = training.init(jax.random.key(config.train.seed))
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        assert ours.sharding == theirs.sharding
        np.testing.assert_array_equal(ours, theirs)
    wq = params["blocks"]["attention"]["wq"]  # [layers, embed, heads, head_dim]
    assert wq.sharding.spec[1:3] == (("fsdp", "context"), "tensor")

    rows, length = config.train.global_batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, (rows, length), np.int32)
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, length), np.int32),
        "loss_mask": np.ones((rows, length), np.int32),
    }
    loss_sum, count, byte_count = jit_eval_step(config, model, ByteTokenizer().token_bytes())(
        params, pipeline.to_global(batch, model.batch_sharding)
    )
    assert int(count) == rows * length and int(byte_count) == rows * length
    assert abs(float(loss_sum) / float(count) - np.log(config.model.vocab_size)) < 0.1
