"""Expert parallelism (mesh.expert): the MoE layer in its shard_map, tokens sent to their experts'
devices and back by all-to-all, against the same layer on one device (dropless: equal; with a
capacity: each device's own tokens, as a per-shard loop); a Mixtral trained on expert = 2, 4, 8
with data, fsdp and tensor gives one device's losses, and resumes onto another expert split;
what the axis cannot do is one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, train_losses
from flax import nnx

from jaxlm import parallel
from jaxlm.config import MESH_AXES
from jaxlm.errors import ConfigError
from jaxlm.model import moe
from jaxlm.model.decoder import MOE_RULES
from jaxlm.model.moe import MoE, MoESpec
from jaxlm.training.train import train

RULES = {"length": ("context",), **MOE_RULES}


def mesh_of(**sizes: int):
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=parallel.AUTO_AXES, devices=jax.devices()[: np.prod(shape)]
    )


def layer(capacity_factor=None, kernel="ragged_dot"):
    spec = MoESpec(num_experts=8, top_k=2, expert_dim=16, capacity_factor=capacity_factor, kernel=kernel)
    spec = spec if kernel == "ragged_dot" else MoESpec(**{**spec.__dict__, "interpret": True})
    return nnx.split(MoE(32, spec, nnx.Rngs(0), 0.2, 0.2, jnp.float32))


def objective(graphdef, state, x):
    out = nnx.merge(graphdef, state)(x)
    return jnp.sum(out.y**2) + out.aux_losses["load_balance"] + out.aux_losses["router_z"], out


def on(mesh, graphdef, state, x):
    """The objective, its gradients and the layer's output, under `mesh`'s sharding (None: one device)."""

    def run(state, x):
        with parallel.activation_sharding(mesh, RULES) if mesh else _nothing():
            return jax.value_and_grad(lambda s: objective(graphdef, s, x), has_aux=True)(state)

    return jax.jit(run)(state, x)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


X = jax.random.normal(jax.random.key(1), (8, 12, 32))


@pytest.mark.parametrize(
    ("sizes", "skewed"),
    [
        ({"expert": 2}, True),
        ({"expert": 4, "data": 2}, False),
        ({"expert": 8}, True),
        ({"expert": 2, "fsdp": 2, "tensor": 2}, False),
        ({"expert": 2, "context": 2, "tensor": 2}, True),
    ],
    ids=lambda value: (
        "-".join(f"{a}{n}" for a, n in value.items())
        if isinstance(value, dict)
        else ("skewed" if value else "balanced")
    ),
)
def test_dropless_experts_split_over_devices_compute_what_one_device_does(sizes, skewed):
    graphdef, state = layer()
    x = X
    if skewed:  # most tokens choose experts 0 and 1, which live on the first device
        router = state["router"][...]
        state["router"][...] = router.at[:, :2].add(0.5).at[:, 2:].add(-0.5)
        x = X + 1.0
    (loss, out), grads = on(None, graphdef, state, x)
    (split_loss, split_out), split_grads = on(mesh_of(**sizes), graphdef, state, x)
    if skewed:
        assert float(out.load[:2].sum()) > 0.9
    np.testing.assert_allclose(split_out.y, out.y, rtol=1e-5, atol=1e-5)
    assert abs(float(split_loss) - float(loss)) / float(loss) < 1e-5
    np.testing.assert_allclose(split_out.load, out.load, atol=1e-7)
    for name in ("load_balance", "router_z"):
        np.testing.assert_allclose(split_out.aux_losses[name], out.aux_losses[name], rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    for got, expected in zip(jax.tree.leaves(split_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6 * scale)


def test_megablox_runs_in_the_expert_parallel_shard_map():
    graphdef, state = layer(kernel="megablox")
    (_, out), _ = on(None, *layer(), X)
    (_, split_out), _ = on(mesh_of(expert=4, data=2), graphdef, state, X)
    np.testing.assert_allclose(split_out.y, out.y, rtol=1e-5, atol=1e-5)


def test_with_a_capacity_each_device_drops_among_its_own_tokens():
    """GShard's groups: the capacity of a device's [experts, capacity] buffer counts its own
    tokens, so a split layer is the one-device layer run on each device's rows."""
    graphdef, state = layer(capacity_factor=1.0)
    (_, split_out), _ = on(mesh_of(expert=4, data=2), graphdef, state, X)
    model = jax.jit(lambda x: nnx.merge(graphdef, state)(x))  # one compile per row count
    per_shard = [model(X[i : i + 1]) for i in range(8)]  # 8 rows over data × expert: one row each
    np.testing.assert_allclose(
        split_out.y, jnp.concatenate([out.y for out in per_shard]), rtol=1e-5, atol=1e-5
    )
    expected = np.mean([float(out.dropped) for out in per_shard])
    assert expected > 0 and abs(float(split_out.dropped) - expected) < 1e-6
    one = model(X)
    assert float(one.dropped) < expected  # one device's capacity pools every token


def test_a_receive_bound_drops_the_rows_past_a_device_s_buffer():
    """receive_factor=1: each device's experts take as many rows as a device routes; the blocks
    land source after source, each sorted by expert, and what passes the end is dropped. The
    expected output is the one-device layer with the dropped assignments' weights zeroed."""
    graphdef, state = layer()
    state["router"][...] = state["router"][...].at[:, :2].add(0.5).at[:, 2:].add(-0.5)
    x, shards = X + 1.0, 4  # most tokens choose experts 0 and 1, on the first device of each group
    bounded = nnx.merge(graphdef, state)
    bounded.spec = MoESpec(**{**bounded.spec.__dict__, "receive_factor": 1.0})
    (_, out), _ = on(mesh_of(expert=shards, data=2), *nnx.split(bounded), x)

    model = nnx.merge(graphdef, state)
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.route(flat @ model.router[...], model.spec)
    experts = np.asarray(routing.experts).reshape(8, -1)  # 8 devices' rows: data-major, then expert
    keep = np.zeros_like(experts, bool)
    here, assigned = 8 // shards, experts.shape[1]
    for group in range(2):
        landed = np.zeros(shards, int)
        for source in range(group * shards, (group + 1) * shards):
            order = np.argsort(experts[source], kind="stable")
            for device in range(shards):
                block = order[experts[source][order] // here == device]
                room = max(0, assigned - landed[device])
                keep[source, block[:room]] = True
                landed[device] += len(block)
    dropped = 1 - keep.mean()
    assert dropped > 0.2
    weights = routing.weights * jnp.asarray(keep.reshape(routing.weights.shape))
    expected = moe.dropless(
        flat,
        routing._replace(weights=weights),
        model.w_gate[...],
        model.w_up[...],
        model.w_down[...],
        model.spec,
    )
    np.testing.assert_allclose(out.y.reshape(flat.shape), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(out.dropped) - dropped) < 1e-6


MIXTRAL = [
    "model.family=mixtral",
    "model.num_experts=8",
    "model.experts_per_token=2",
    "model.load_balance_weight=0.01",
    "model.router_z_weight=0.001",
    "optim.schedule_steps=4",
    "train.steps=4",
]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    run = tmp_path_factory.mktemp("one")
    train(tiny_config(run, *MIXTRAL, "mesh.fsdp=1"), devices=jax.devices()[:1])
    return train_losses(run)


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert got.keys() == expected.keys() == {1, 2, 3, 4}
    for step, loss in got.items():
        assert abs(loss - expected[step]) / expected[step] < 1e-5, (step, loss, expected[step])


def test_eight_way_expert_parallelism_trains_to_one_device_s_losses(tmp_path, one_device):
    train(tiny_config(tmp_path, *MIXTRAL, "mesh.expert=8", "mesh.fsdp=1"))
    assert_same_losses(train_losses(tmp_path), one_device)


def test_a_run_resumes_exactly_onto_another_expert_split(tmp_path, one_device):
    """Steps 1-2 on expert 4 × fsdp 2, then 3-4 from its checkpoint on expert 2 × data 2 × tensor 2."""
    train(
        tiny_config(tmp_path, *MIXTRAL, "train.steps=2", "checkpoint.every=2", "mesh.expert=4", "mesh.fsdp=2")
    )
    resumed = ["checkpoint.every=2", "mesh.expert=2", "mesh.data=2", "mesh.tensor=2", "mesh.fsdp=1"]
    train(tiny_config(tmp_path, *MIXTRAL, *resumed))
    assert_same_losses(train_losses(tmp_path), one_device)


def test_experts_that_do_not_split_over_the_expert_axis_are_one_line(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^model.num_experts=6 does not split over mesh.expert=4 × mesh.dcn_expert=1 devices; "
        r"use an expert split that divides 6 \(1, 2, 3, 6\)$",
    ):
        tiny_config(tmp_path, *MIXTRAL, "model.num_experts=6", "mesh.expert=4")
    with pytest.raises(
        ConfigError,
        match=r"model.receive_factor=2.0 bounds the dropless experts, and model.capacity_factor=1.25 "
        r"makes them drop by capacity instead; set one of them$",
    ):
        tiny_config(tmp_path, *MIXTRAL, "model.receive_factor=2", "model.capacity_factor=1.25")
    # An axis at -1 is sized by the devices: the shardings say it, before compiling.
    config = tiny_config(tmp_path, *MIXTRAL, "model.num_experts=4", "mesh.expert=-1", "mesh.fsdp=1")
    with pytest.raises(
        ConfigError,
        match=r"^blocks.mlp.w_\w+: dimension expert=4 does not divide over mesh axes expert \(8 devices\)",
    ):
        train(config)


def test_an_expert_axis_for_a_family_without_experts_is_one_line(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^mesh.expert=2 mesh.dcn_expert=1: no logical axis of model.family=llama maps to the "
        r"expert mesh axis \(its models have no experts\); put those devices in mesh.data or mesh.fsdp$",
    ):
        tiny_config(tmp_path, "mesh.expert=2")
