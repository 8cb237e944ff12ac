"""The mixture-of-experts layer (jaxlm/model/moe.py) against a plain per-token loop in NumPy:
both routers (softmax top-k; DeepSeek-V3's sigmoid with a balancing bias, group-limited choice
and a routed scale), dropless grouped matmuls (ragged_dot, and megablox in Pallas interpret mode)
and the capacity path that drops what overflows, with their gradients; the auxiliary losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.model import decoder, moe
from jaxlm.training.metrics import matmul_flops

TOKENS, D, M, E, K = 48, 16, 24, 8, 2


def silu(x):
    return x / (1 + np.exp(-x))


def reference_routing(logits, spec, bias=None):
    """(weights, experts) per token, one token at a time."""
    weights, experts = [], []
    for row in np.asarray(logits, np.float64):
        if spec.router == "softmax":
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            chosen = np.argsort(-probs, kind="stable")[: spec.top_k]
            w = probs[chosen]
        else:
            scores = 1 / (1 + np.exp(-row))
            choice = scores + (0 if bias is None else np.asarray(bias))
            size = len(row) // spec.groups
            group_score = [np.sort(choice[g * size : (g + 1) * size])[-2:].sum() for g in range(spec.groups)]
            allowed = np.argsort(group_score, kind="stable")[::-1][: spec.top_groups]
            masked = np.full_like(choice, -np.inf)
            for g in allowed:
                masked[g * size : (g + 1) * size] = choice[g * size : (g + 1) * size]
            chosen = np.argsort(-masked, kind="stable")[: spec.top_k]
            w = scores[chosen]
        if spec.norm_top_k:
            w = w / w.sum()
        weights.append(w * (spec.routed_scale if spec.router == "sigmoid" else 1.0))
        experts.append(chosen)
    return np.array(weights), np.array(experts)


def reference_layer(x, weights, experts, w_gate, w_up, w_down, capacity=None):
    """Σ_k weight · expert(x) per token; with a capacity, each expert takes first choices before
    second ones, earlier tokens first, and skips what is past its capacity."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    y, taken, dropped = np.zeros_like(x), np.zeros(w_gate.shape[0], int), 0
    for choice in range(experts.shape[1]):
        for token in range(len(x)):
            e = experts[token, choice]
            if capacity is not None and taken[e] >= capacity:
                dropped += 1
                continue
            taken[e] += 1
            hidden = silu(x[token] @ w_gate[e]) * (x[token] @ w_up[e])
            y[token] += weights[token, choice] * (hidden @ w_down[e])
    return y, dropped / experts.size


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(TOKENS, D)), jnp.float32)
    w = [
        jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32) for shape in [(E, D, M), (E, D, M), (E, M, D)]
    ]
    logits = jnp.asarray(rng.normal(size=(TOKENS, E)) * 2, jnp.float32)
    return x, w, logits


SOFTMAX = moe.MoESpec(num_experts=E, top_k=K, expert_dim=M)
SIGMOID = moe.MoESpec(
    num_experts=E, top_k=K, expert_dim=M, router="sigmoid", groups=4, top_groups=2, routed_scale=2.5
)


@pytest.mark.parametrize(
    "spec", [SOFTMAX, moe.MoESpec(E, 3, M, norm_top_k=False), SIGMOID], ids=["softmax", "unnormed", "sigmoid"]
)
def test_routers_choose_and_weigh_as_a_per_token_loop(inputs, spec):
    _, _, logits = inputs
    bias = jnp.linspace(-0.3, 0.3, E) if spec.router == "sigmoid" else None
    routing = moe.route(logits, spec, bias)
    weights, experts = reference_routing(logits, spec, bias)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.experts), axis=1), np.sort(experts, axis=1))
    order = np.argsort(np.asarray(routing.experts), axis=1)
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(routing.weights), order, 1),
        np.take_along_axis(weights, np.argsort(experts, axis=1), 1),
        rtol=1e-5,
    )


def test_the_balancing_bias_moves_the_choice_not_the_weights(inputs):
    _, _, logits = inputs
    plain = moe.route(logits, SIGMOID)
    favoured = moe.route(logits, SIGMOID, jnp.zeros(E).at[0].set(10.0))
    assert bool(jnp.all(jnp.any(favoured.experts == 0, axis=1)))  # expert 0 is chosen by all
    scores = jax.nn.sigmoid(logits)
    chosen = jnp.take_along_axis(scores, favoured.experts, axis=1)
    np.testing.assert_allclose(favoured.weights, chosen / chosen.sum(1, keepdims=True) * 2.5, rtol=1e-6)
    assert not bool(jnp.all(plain.experts == favoured.experts))


@pytest.mark.parametrize("kernel", ["ragged_dot", "megablox"])
def test_dropless_experts_compute_the_per_token_loop(inputs, kernel):
    x, w, logits = inputs
    spec = moe.MoESpec(num_experts=E, top_k=K, expert_dim=M, kernel=kernel, interpret=True)
    routing = moe.route(logits, spec)
    expected, _ = reference_layer(x, np.asarray(routing.weights), np.asarray(routing.experts), *w)
    np.testing.assert_allclose(moe.dropless(x, routing, *w, spec), expected, atol=2e-5, rtol=1e-5)


def test_megablox_takes_rows_that_are_no_whole_number_of_its_tiles(inputs):
    """200 rows (100 tokens × 2): the kernel's 128-row tiles need 256; the rows are padded and the
    padding, past every group, is never computed."""
    _, w, _ = inputs
    rng = np.random.default_rng(1)
    x, logits = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((100, D), (100, E)))
    spec = moe.MoESpec(num_experts=E, top_k=K, expert_dim=M, kernel="megablox", interpret=True)
    routing = moe.route(logits, spec)
    expected, _ = reference_layer(x, np.asarray(routing.weights), np.asarray(routing.experts), *w)
    np.testing.assert_allclose(moe.dropless(x, routing, *w, spec), expected, atol=2e-5, rtol=1e-5)


def dense_reference(x, routing, w_gate, w_up, w_down):
    """Every assignment with its expert's weights gathered: a differentiable per-token loop."""
    gathered = [jnp.take(weight, routing.experts, axis=0) for weight in (w_gate, w_up, w_down)]
    hidden = jax.nn.silu(jnp.einsum("td,tkdm->tkm", x, gathered[0])) * jnp.einsum(
        "td,tkdm->tkm", x, gathered[1]
    )
    return jnp.einsum("tkm,tkmd,tk->td", hidden, gathered[2], routing.weights)


@pytest.mark.parametrize(
    "spec",
    [
        SOFTMAX,
        moe.MoESpec(num_experts=E, top_k=K, expert_dim=M, kernel="megablox", interpret=True),
        moe.MoESpec(num_experts=E, top_k=K, expert_dim=M, capacity_factor=float(E)),  # nothing dropped
    ],
    ids=["ragged_dot", "megablox", "capacity"],
)
def test_gradients_through_the_router_and_the_experts_are_the_loop_s(inputs, spec):
    x, w, _ = inputs
    router = jnp.asarray(np.random.default_rng(1).normal(size=(D, E)), jnp.float32)

    def loss(compute, x, w, router):
        routing = moe.route(x @ router, spec)
        y = compute(x, routing, *w)
        return jnp.sum(jnp.cos(jnp.arange(D)) * y)

    def ours(x, routing, *w):
        return (
            moe.with_capacity(x, routing, *w, spec)[0]
            if spec.capacity_factor
            else moe.dropless(x, routing, *w, spec)
        )

    got = jax.grad(loss, argnums=(1, 2, 3))(ours, x, w, router)
    expected = jax.grad(loss, argnums=(1, 2, 3))(dense_reference, x, w, router)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_the_capacity_path_drops_what_overflows_as_the_loop_does(inputs, factor):
    x, w, logits = inputs
    spec = moe.MoESpec(num_experts=E, top_k=K, expert_dim=M, capacity_factor=factor)
    routing = moe.route(logits, spec)
    capacity = spec.capacity(TOKENS)
    assert capacity == math.ceil(factor * TOKENS * K / E)
    expected, dropped = reference_layer(
        x, np.asarray(routing.weights), np.asarray(routing.experts), *w, capacity
    )
    y, share = moe.with_capacity(x, routing, *w, spec)
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    assert (
        float(share) == pytest.approx(dropped, rel=1e-5) and dropped > 0
    )  # these logits overflow some expert


def test_the_auxiliary_losses_and_the_load():
    uniform = moe.Routing(
        jnp.full((E, 2), 0.5),
        jnp.stack([jnp.arange(E), (jnp.arange(E) + 1) % E], axis=1),
        jnp.full((E, E), 1 / E),
    )
    assert float(moe.load_balance_loss(uniform, E)) == pytest.approx(2.0)  # k, when balanced
    np.testing.assert_allclose(moe.expert_load(uniform, E), np.full(E, 1 / E))
    crowded = moe.Routing(
        jnp.full((E, 2), 0.5), jnp.zeros((E, 2), jnp.int32).at[:, 1].set(1), jnp.tile(jnp.eye(E)[:1], (E, 1))
    )
    assert float(moe.load_balance_loss(crowded, E)) == pytest.approx(E)  # all on expert 0 and 1, p = 1 on 0
    logits = jnp.asarray([[0.0, 0.0], [3.0, 1.0]])
    expected = np.mean([math.log(2) ** 2, (3 + math.log(1 + math.exp(-2))) ** 2])
    assert float(moe.router_z_loss(logits)) == pytest.approx(expected, rel=1e-6)


def test_the_layer_adds_its_shared_experts_and_names_the_expert_axis():
    spec = moe.MoESpec(
        num_experts=E, top_k=K, expert_dim=M, shared_dim=32, router="sigmoid", groups=2, top_groups=1
    )
    layer = moe.MoE(D, spec, nnx.Rngs(0), 0.3, 0.3, jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    out = layer(x)
    flat = x.reshape(-1, D)
    routing = moe.route(flat @ layer.router[...], spec, layer.router_bias[...])
    routed = moe.dropless(flat, routing, layer.w_gate[...], layer.w_up[...], layer.w_down[...], spec)
    shared = (jax.nn.silu(flat @ layer.shared_gate[...]) * (flat @ layer.shared_up[...])) @ layer.shared_down[
        ...
    ]
    np.testing.assert_allclose(out.y.reshape(-1, D), routed + shared, atol=1e-5)
    assert set(out.aux_losses) == {"load_balance", "router_z"} and float(out.dropped) == 0.0
    assert float(out.load.sum()) == pytest.approx(1.0)
    assert layer.w_gate.out_sharding == ("expert", "embed", "expert_mlp")
    # The balancing bias is a parameter (loaded, checkpointed, exported with the rest) that only
    # moves the choice: it gets no gradient, and no weight decay.
    assert len(jax.tree.leaves(nnx.state(layer, moe.RouterBias))) == 1
    assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 8
    graphdef, params = nnx.split(layer, nnx.Param)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x).y ** 2))(params)
    assert float(jnp.abs(grads["router_bias"][...]).max()) == 0.0
    assert float(jnp.abs(grads["router"][...]).max()) > 0
    assert not decoder.decays("blocks.mlp.router_bias", decay_embeddings=True)


def test_flop_counts_take_each_row_through_its_own_expert_only(inputs):
    """`matmul_flops` (plans, MFU checks) counts a grouped matmul as its rows times their own
    expert's matrix, forward and backward: 3 × the forward's 3 matmuls, plus the weighing."""
    x, w, logits = inputs
    routing = moe.route(logits, SOFTMAX)

    def loss(x, w):
        return jnp.sum(moe.dropless(x, routing, *w, SOFTMAX) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr
    expected = 3 * 3 * 2 * TOKENS * K * D * M + 2 * 2 * TOKENS * K * D
    assert matmul_flops(jaxpr) == expected
    # megablox visits a traced number of row tiles: counted at their bound, every row tile once
    # per tile of the other dimensions (96 rows fit one tile here: the same count as ragged_dot).
    megablox = moe.MoESpec(num_experts=E, top_k=K, expert_dim=M, kernel="megablox", interpret=True)
    forward = jax.make_jaxpr(lambda x, w: moe.dropless(x, routing, *w, megablox))(x, w).jaxpr
    assert matmul_flops(forward) == 3 * 2 * TOKENS * K * D * M + 2 * TOKENS * K * D
