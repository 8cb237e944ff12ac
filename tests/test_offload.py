"""optim.offload_state: the optimizer state lives in pinned host memory between steps, trains to
the same losses, checkpoints in the same format, and leaves device memory during the backward pass."""

import importlib.util

import jax
import numpy as np
import pytest
from conftest import tiny_config, train_losses

from jaxlm.data import pipeline
from jaxlm.planning import plan
from jaxlm.training.checkpoint import Checkpointer
from jaxlm.training.setup import HOST, build_train, jit_train_step
from jaxlm.training.train import _data, _GlobalBatches, train

RUN = ["train.steps=4", "optim.schedule_steps=4", "checkpoint.every=2", "mesh.fsdp=4", "mesh.data=2"]
OFFLOAD = "optim.offload_state=true"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain")
    train(tiny_config(run_dir, *RUN))
    return run_dir


@pytest.fixture(scope="module")
def offloaded_then_plain(tmp_path_factory):
    """Two steps with the state offloaded, then resumed without offload to step 4."""
    run_dir = tmp_path_factory.mktemp("offloaded")
    train(tiny_config(run_dir, *RUN, OFFLOAD, "train.steps=2"))
    train(tiny_config(run_dir, *RUN))
    return run_dir


def assert_same_losses(run_dir, expected_dir, steps):
    losses, expected = train_losses(run_dir), train_losses(expected_dir)
    for step in steps:
        assert abs(losses[step] - expected[step]) <= 1e-6 * expected[step], (step, losses, expected)


def test_offloaded_steps_give_the_losses_of_steps_without_offload(offloaded_then_plain, plain):
    assert_same_losses(offloaded_then_plain, plain, steps=(1, 2))


def test_a_checkpoint_saved_with_offload_resumes_exactly_without_it(offloaded_then_plain, plain):
    assert_same_losses(offloaded_then_plain, plain, steps=(3, 4))


def test_state_restored_onto_another_mesh_and_stepped_keeps_the_optimizer_state_in_host_memory(plain):
    # A checkpoint written without offload, restored with it: the state lands in host memory.
    config = tiny_config(plain, *RUN, OFFLOAD, "mesh.fsdp=8", "mesh.data=1")
    setup = build_train(config)
    tokenizer, corpus = _data(config)
    shape = (config.train.global_batch_size, config.data.seq_len)
    data = pipeline.HostBatches(corpus, config, tokenizer, setup.model.process_rows(shape))
    checkpointer = Checkpointer(config)
    try:
        state = checkpointer.restore_or_init(setup, data)
        assert int(state.step) == 4
        assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.opt_state)} == {HOST}
        state, metrics = jit_train_step(config, setup)(state, next(_GlobalBatches(data, setup, config)))
    finally:
        checkpointer.close()
        data.close()
    assert np.isfinite(float(metrics["loss"]))
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.opt_state)} == {HOST}
    assert HOST not in {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.params)}


def device_peak(config, devices) -> tuple[int, int]:
    """The compiled step's peak of device memory per chip (the compiler's peak counts the host
    memory arguments too), and the optimizer state's bytes as the compiler lays them out."""
    _, _, compiled, refusal = plan.compile_step(config, devices)
    assert refusal is None
    memory = compiled.memory_analysis()
    return (
        memory.peak_memory_in_bytes - memory.host_argument_size_in_bytes,
        memory.host_argument_size_in_bytes,
    )


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu to compile for a TPU")
def test_offload_lowers_the_planned_peak_by_about_the_optimizer_state(tmp_path):
    devices = plan.topology_devices("v5e:2x2")
    before, _ = device_peak(tiny_config(tmp_path), devices)
    after, optimizer_bytes = device_peak(tiny_config(tmp_path, OFFLOAD), devices)
    assert optimizer_bytes > 0
    # The forward and backward pass, where the peak is, run without the optimizer state.
    assert before - after >= 0.8 * optimizer_bytes, (before, after, optimizer_bytes)
