"""Context parallelism: the `context` mesh axis splits every row's sequence, load-balanced for the
causal mask; any split of the 8 devices gives one device's losses on packed 512-token rows, and
a run resumes exactly."""

import functools
import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY, read_metrics, tiny_config, train_losses
from flax import nnx
from test_multihost import free_port, start

from jaxlm import parallel
from jaxlm.errors import ConfigError
from jaxlm.model import llama
from jaxlm.model.layers import attention_mask
from jaxlm.model.llama import LlamaConfig
from jaxlm.training.setup import build_model
from jaxlm.training.train import train

ROWS = ["data.seq_len=512", "train.global_batch_size=4", "train.steps=4", "optim.schedule_steps=4"]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-device")
    train(tiny_config(run_dir, *ROWS, "mesh.fsdp=1"), devices=jax.devices()[:1])
    return train_losses(run_dir)


def assert_same_losses(losses, expected, tolerance):
    assert losses.keys() == expected.keys() == {1, 2, 3, 4}
    for step, loss in losses.items():
        assert abs(loss - expected[step]) / abs(expected[step]) < tolerance, (step, loss, expected[step])


# Also the chunked loss (each shard's part of the rows at a time) and micro-batches.
RESUMABLE = [
    *ROWS,
    "checkpoint.every=2",
    "mesh.context=4",
    "mesh.fsdp=2",
    "train.loss_chunk=32",
    "train.micro_batches=2",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config(run_dir, *RESUMABLE))
    return run_dir


@pytest.mark.parametrize(
    "mesh",
    [
        ["mesh.context=8", "mesh.fsdp=1"],
        ["mesh.context=2", "mesh.data=2", "mesh.tensor=2", "mesh.fsdp=1", "model.remat=full"],
    ],
    ids=["context8", "context2-data2-tensor2-remat"],
)
def test_every_context_split_gives_the_single_device_losses(tmp_path, one_device_losses, mesh):
    train(tiny_config(tmp_path, *ROWS, *mesh))
    assert_same_losses(train_losses(tmp_path), one_device_losses, 1e-5)


def test_a_context_parallel_run_resumes_exactly(tmp_path, uninterrupted, one_device_losses):
    assert_same_losses(train_losses(uninterrupted), one_device_losses, 1e-5)
    train(tiny_config(tmp_path, *RESUMABLE, "train.steps=2"))
    train(tiny_config(tmp_path, *RESUMABLE))
    assert train_losses(tmp_path) == pytest.approx(train_losses(uninterrupted), abs=1e-6)


@pytest.mark.multiprocess
def test_a_context_axis_across_two_processes_gives_the_single_device_losses_and_counts(
    tmp_path, one_device_losses
):
    """Both processes hold halves of the same rows: they read the same rows, and one counts them."""
    port = free_port()
    args = [*TINY, *ROWS, "mesh.context=8", "mesh.fsdp=1", f"run.dir={tmp_path}"]
    processes = [start(i, 2, port, args, tmp_path / f"p{i}.log") for i in range(2)]
    codes = [process.wait(timeout=300) for process in processes]
    assert codes == [0, 0], (tmp_path / "p0.log").read_text()[-2000:]
    assert_same_losses(train_losses(tmp_path), one_device_losses, 1e-5)
    last = [record for record in read_metrics(tmp_path) if "loss" in record][-1]
    assert last["tokens_seen"] == 4 * 4 * 512  # steps × rows × length: not counted twice


def test_each_shard_of_the_load_balanced_order_holds_the_same_causal_work():
    length, shards = 64, 4
    order = parallel.load_balanced_order(length, shards)
    assert sorted(order) == list(range(length))
    # A query at original position p attends p + 1 keys: every shard's queries attend as many.
    work = [(part + 1).sum() for part in np.split(order, shards)]
    assert len(set(work)) == 1
    assert list(parallel.load_balanced_order(length, 1)) == list(range(length))


def test_rows_laid_out_with_their_order_give_the_hidden_states_of_the_row_in_its_own_order():
    config = LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    model = llama.FAMILY.build(config, nnx.Rngs(0))
    length = 32
    tokens = jax.random.randint(jax.random.key(1), (2, length), 0, 64)
    segment_ids = jnp.asarray([[1] * 12 + [2] * 14 + [0] * 6] * 2)  # two documents, then padding
    positions = jnp.asarray([list(range(12)) + list(range(14)) + [0] * 6] * 2)
    order = parallel.load_balanced_order(length, 4)

    @jax.jit
    def hidden(tokens, positions, segment_ids, order=None):
        return model(tokens, positions, segment_ids, return_hidden=True, order=order).hidden

    natural = hidden(tokens, positions, segment_ids)
    laid_out = jax.jit(functools.partial(hidden, order=order))(
        tokens[:, order], positions[:, order], segment_ids[:, order]
    )
    real = np.asarray(segment_ids[:, order] > 0)
    np.testing.assert_allclose(np.asarray(laid_out)[real], np.asarray(natural[:, order])[real], atol=1e-5)
    # Without its order the same layout is another (wrong) causal mask: the test can fail.
    unordered = hidden(tokens[:, order], positions[:, order], segment_ids[:, order])
    assert not np.allclose(np.asarray(unordered)[real], np.asarray(natural[:, order])[real], atol=1e-3)
    mask = attention_mask(segment_ids[:, order], order)[0, 0]
    assert bool(mask[np.argmin(order), np.argmin(order)]) and not bool(
        mask[np.argmin(order), np.argmax(order)]
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.seq_len=40", "mesh.context=8", "mesh.fsdp=1"],
            "data.seq_len=40 does not split into the 16 equal chunks",
        ),
        (
            ["data.seq_len=512", "mesh.context=8", "mesh.fsdp=1", "train.loss_chunk=128"],
            "train.loss_chunk=128 does not divide the 64 positions each of the mesh.context=8 shards holds",
        ),
    ],
)
def test_rows_that_context_parallelism_cannot_split_fail_in_one_line_before_compiling(
    tmp_path, overrides, expected
):
    with pytest.raises(ConfigError, match=expected) as error:
        build_model(tiny_config(tmp_path, *overrides))
    assert "\n" not in str(error.value)


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu comes with pip install -e ".[test]"'
)
def test_the_long_context_bench_reports_a_compiled_step_per_length_and_path():
    args = [*TINY, "mesh.context=2", "mesh.fsdp=2", "--topology", "v5e:2x2", "--lengths", "256", "512"]
    result = subprocess.run(
        [sys.executable, "bench/long_context.py", "configs/tiny.yaml", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(result.stdout)["runs"]
    assert set(runs) == {"xla/256", "splash/256", "xla/512", "splash/512"}
    assert all(run["fits"] and run["peak_bytes"] > 0 and run["mesh"]["context"] == 2 for run in runs.values())
    for path in ("xla", "splash"):  # longer rows, more memory (at this size, not yet the scores')
        assert runs[f"{path}/512"]["peak_bytes"] > runs[f"{path}/256"]["peak_bytes"]
