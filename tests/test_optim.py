"""Optimizer: learning-rate schedules and the weight-decay mask."""

import jax
import jax.numpy as jnp
import pytest

from jaxlm.config import load_config
from jaxlm.model import registry
from jaxlm.training.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


def schedule_of(*overrides):
    config = load_config(
        None, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", *overrides]
    )
    return learning_rate_schedule(config.optim, 100)


def test_every_schedule_warms_up_linearly_from_zero():
    for name in ("cosine", "wsd", "constant"):
        schedule = schedule_of(f"optim.schedule={name}")
        assert float(schedule(0)) == 0.0
        assert float(schedule(5)) == pytest.approx(0.5)
        assert float(schedule(10)) == pytest.approx(1.0)


def test_cosine_decays_smoothly_to_the_floor():
    schedule = schedule_of("optim.schedule=cosine")
    assert float(schedule(55)) == pytest.approx(0.55, abs=1e-6)  # halfway: (1 + 0.1) / 2
    assert float(schedule(100)) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_at_the_end():
    schedule = schedule_of("optim.schedule=wsd", "optim.decay_fraction=0.2")
    assert float(schedule(50)) == pytest.approx(1.0)
    assert float(schedule(80)) == pytest.approx(1.0)
    assert float(schedule(90)) == pytest.approx(0.55)
    assert float(schedule(100)) == pytest.approx(0.1)


def test_constant_stays_at_the_peak():
    schedule = schedule_of("optim.schedule=constant")
    assert float(schedule(99)) == pytest.approx(1.0)


def test_weight_decay_skips_norms_and_by_default_the_embedding():
    params = {
        "embedding": jnp.ones((4, 2)),
        "final_norm": {"scale": jnp.ones(2)},
        "blocks": {"mlp": {"w_up": jnp.ones((2, 2, 3))}, "mlp_norm": {"scale": jnp.ones((2, 2))}},
    }
    llama = registry.get("llama")
    mask = weight_decay_mask(params, llama, decay_embeddings=False)
    assert mask == {
        "embedding": False,
        "final_norm": {"scale": False},
        "blocks": {"mlp": {"w_up": True}, "mlp_norm": {"scale": False}},
    }
    assert weight_decay_mask(params, llama, decay_embeddings=True)["embedding"] is True

    optimizer, _ = make_optimizer(
        load_config(None, ["optim.weight_decay=0.5", "optim.lr=0.1", "optim.warmup_steps=0"])
    )
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    state = optimizer.init(params)
    updates, _ = optimizer.update(zero_grads, state, params)
    assert float(jnp.abs(updates["blocks"]["mlp"]["w_up"]).sum()) > 0  # decayed
    assert float(jnp.abs(updates["final_norm"]["scale"]).sum()) == 0  # not decayed
    assert float(jnp.abs(updates["embedding"]).sum()) == 0
