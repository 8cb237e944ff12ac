"""Parallelism: any even split of the 8 devices trains to the same losses as one device;
parameters are born sharded; impossible meshes fail before compiling."""

import importlib.util

import jax
import numpy as np
import pytest
from conftest import tiny_config, train_losses
from jax.experimental import topologies
from jax.sharding import PartitionSpec

from jaxlm import parallel
from jaxlm.errors import ConfigError
from jaxlm.training.setup import build_train
from jaxlm.training.train import train

STEPS = ["train.steps=3"]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-device")
    train(tiny_config(run_dir, *STEPS, "mesh.fsdp=1"), devices=jax.devices()[:1])
    return train_losses(run_dir)


@pytest.mark.parametrize(
    ("data", "fsdp", "tensor"),
    # Pure FSDP over 8 is every tiny_config's default mesh; fsdp 4 × tensor 2 is the accumulation
    # test's below; tests/test_context.py adds context splits of the same kind.
    [(8, 1, 1), (2, 2, 2), (2, 1, 4)],
)
def test_every_mesh_split_gives_the_single_device_losses(tmp_path, single_device_losses, data, fsdp, tensor):
    mesh = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
    if tensor > 2:  # 2 kv heads cannot split 4 ways: replicate them, as the error message says
        mesh.append("mesh.rules.kv_heads=null")
    config = tiny_config(tmp_path, *STEPS, *mesh)
    train(config)
    losses = train_losses(tmp_path)
    assert losses.keys() == single_device_losses.keys() == {1, 2, 3}
    for step, loss in losses.items():
        assert abs(loss - single_device_losses[step]) / abs(single_device_losses[step]) < 1e-4


def test_simulated_slices_over_dcn_give_the_same_losses(tmp_path, single_device_losses):
    config = tiny_config(tmp_path, *STEPS, "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=4")
    mesh = parallel.make_mesh(config)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    # Each slice (here: a block of 4 devices standing in for one) is one index of the DCN axis.
    assert {d.id for d in mesh.devices[0].flat} == {0, 1, 2, 3}
    train(config)
    losses = train_losses(tmp_path)
    for step, loss in losses.items():
        assert abs(loss - single_device_losses[step]) / abs(single_device_losses[step]) < 1e-4


def two_tpu_slices() -> list[jax.Device]:
    """libtpu's compile-only devices of two v5e 2x2 slices: real devices with a slice_index."""
    return list(topologies.get_topology_desc("v5e:2x2", "tpu", num_slices=2).devices)


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu comes with pip install -e ".[test]"'
)


@needs_libtpu
@pytest.mark.parametrize("axis", ["data", "fsdp", "context", "tensor"])
def test_each_tpu_slice_is_one_half_of_the_dcn_axis(axis):
    config = tiny_config(".", f"mesh.dcn_{axis}=2", "mesh.data=1", "mesh.fsdp=4")
    mesh = parallel.make_mesh(config, two_tpu_slices())
    assert mesh.shape[axis] == 2 * getattr(config.mesh, axis)
    # The DCN part of the axis is its major part, so the slices are its two halves.
    halves = np.split(mesh.devices, 2, axis=mesh.axis_names.index(axis))
    assert [{d.slice_index for d in half.flat} for half in halves] == [{0}, {1}]


@needs_libtpu
def test_dcn_slices_that_are_not_the_tpu_slices_fail_in_one_line():
    with pytest.raises(
        ConfigError, match=r"mesh.dcn_\* ask for 4 slices but the devices come in 2 \(slices\)"
    ):
        parallel.make_mesh(tiny_config(".", "mesh.dcn_data=4", "mesh.fsdp=2"), two_tpu_slices())


def test_gradient_accumulation_and_chunked_loss_give_the_same_losses(tmp_path, single_device_losses):
    train(
        tiny_config(
            tmp_path,
            *STEPS,
            "train.micro_batches=2",
            "train.loss_chunk=8",
            "mesh.fsdp=4",
            "mesh.data=1",
            "mesh.tensor=2",
        )
    )
    losses = train_losses(tmp_path)
    for step, loss in losses.items():
        assert abs(loss - single_device_losses[step]) / abs(single_device_losses[step]) < 1e-4


def test_parameters_and_optimizer_state_are_initialised_sharded(tmp_path):
    config = tiny_config(tmp_path, "mesh.fsdp=4", "mesh.tensor=2")
    setup = build_train(config)
    state = setup.init(jax.random.key(0))
    wq = state.params["blocks"]["attention"]["wq"]  # [layers, embed, heads, head_dim]
    assert wq.sharding.spec == PartitionSpec(None, ("fsdp", "context"), "tensor", None)
    shard = wq.addressable_shards[0].data
    assert shard.shape == (2, 64 // 4, 4 // 2, 16)  # each device holds 1/8 of it
    embedding = state.params["embedding"]
    assert embedding.sharding.spec == PartitionSpec("tensor", ("fsdp", "context"))
    # Adam's moments follow their parameters' sharding.
    moments = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    mu = next(leaf for leaf in moments if hasattr(leaf, "mu")).mu
    assert mu["blocks"]["attention"]["wq"].sharding.spec == wq.sharding.spec
    # No device holds the whole model.
    for device in jax.devices():
        held = sum(
            s.data.size
            for leaf in jax.tree.leaves(state.params)
            for s in leaf.addressable_shards
            if s.device == device
        )
        assert held < sum(leaf.size for leaf in jax.tree.leaves(state.params)) / 2


def test_init_is_sharded_inside_jit_not_gathered_on_one_device(tmp_path):
    setup = build_train(tiny_config(tmp_path, "mesh.fsdp=8"))
    # The compiled init is SPMD-partitioned: its outputs on one device are a fraction of the state.
    memory = setup.init.lower(jax.random.key(0)).compile().memory_analysis()
    total_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(setup.abstract_state))
    assert memory.output_size_in_bytes < total_bytes / 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["mesh.fsdp=3"], r"mesh data=1 fsdp=3 expert=1 context=1 tensor=1 uses 3 devices but there are 8"),
        (
            ["mesh.fsdp=-1", "mesh.tensor=3"],
            r"needs a multiple of 3 devices for mesh.fsdp=-1, but there are 8",
        ),
        (
            ["mesh.fsdp=8", "train.global_batch_size=12"],
            r"12 rows per micro-batch, not divisible by the 8 data-parallel devices",
        ),
        (
            ["mesh.fsdp=1", "mesh.tensor=8"],
            r"dimension kv_heads=2 does not divide over mesh axes tensor \(8 devices\)",
        ),
        (["mesh.dcn_data=3"], r"mesh.dcn_\* ask for 3 slices but 8 devices do not split into 3 equal slices"),
        (
            ["attention.kernel=cudnn"],
            r"attention.kernel=cudnn needs an NVIDIA GPU .* devices are cpu; use attention.kernel=auto",
        ),
    ],
)
def test_impossible_meshes_fail_before_compiling(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        build_train(tiny_config(tmp_path, *overrides))


def test_logical_rules_map_to_partition_specs():
    rules = {"batch": ["data", "fsdp"], "embed": ["fsdp"], "heads": ["tensor"], "length": None}
    assert parallel.logical_to_spec(("batch", "length", "embed"), rules) == PartitionSpec(
        ("data", "fsdp"), None, None
    )
    assert parallel.logical_to_spec(("embed", "heads"), rules) == PartitionSpec("fsdp", "tensor")
    assert parallel.mesh_shape(tiny_config(".", "mesh.tensor=2").mesh, 8) == {
        "data": 1,
        "fsdp": 4,
        "expert": 1,
        "context": 1,
        "tensor": 2,
    }
