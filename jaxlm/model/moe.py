"""Mixture of experts, the layer any family can put where its MLP is: a router picks `top_k` of
`num_experts` gated MLPs for each token and sums their outputs, weighted by its scores; shared
experts (DeepSeek) see every token besides.

Routers (`route`):
- `softmax` (Mixtral, Qwen3-MoE, OLMoE): the top k of softmax(x·W_router), renormalised to sum
  to 1 with `norm_top_k` (Mixtral always; Qwen3-MoE's norm_topk_prob).
- `sigmoid` (DeepSeek-V3): scores sigmoid(x·W_router); the choice adds a per-expert bias (the
  auxiliary-loss-free balancing term) and is limited to the `top_groups` of `groups` expert groups
  (each scored by its two best experts); the weights are the chosen experts' scores without the
  bias, renormalised with `norm_top_k`, times `routed_scale`.

Experts compute either dropless, every assignment in grouped matmuls over the assignments sorted
by expert (`jax.lax.ragged_dot`, or on TPU the Pallas megablox kernel), or with a capacity: each
expert takes at most ceil(capacity_factor · tokens · k / experts) assignments, first choices
before second ones and earlier tokens first, and the rest are dropped (the token keeps its other
experts' outputs, and the residual). The capacity path is fixed-shape batched matmuls over
[experts, capacity], which is what expert parallelism's all-to-all sends.

The auxiliary losses (`load_balance_loss`, `router_z_loss`) and the per-expert load are returned
beside the output for the family to add through `ModelOutput.aux_losses`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec

from jaxlm import parallel
from jaxlm.model.layers import param

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
KERNELS = ("auto", "ragged_dot", "megablox")


@dataclass(frozen=True)
class MoESpec:
    """What a family's MoE layer computes (derived from its config, as `decoder.DecoderSpec`)."""

    num_experts: int
    top_k: int
    expert_dim: int  # hidden width of each routed expert's gated MLP
    shared_dim: int = 0  # hidden width of the shared experts' MLP, all of them as one (0: none)
    router: str = "softmax"  # softmax or sigmoid
    norm_top_k: bool = True  # renormalise the chosen experts' weights to sum to 1
    groups: int = 1  # sigmoid router: expert groups, of which the top `top_groups` are eligible
    top_groups: int = 1
    routed_scale: float = 1.0  # sigmoid router: the weights' factor (routed_scaling_factor)
    capacity_factor: float | None = None  # None: dropless
    # Dropless under expert parallelism: rows a device's experts receive at most, as a multiple of
    # the rows each device routes (None: every row of every device, never dropping).
    receive_factor: float | None = None
    kernel: str = "ragged_dot"  # ragged_dot or megablox (a resolved `KERNELS` entry)
    activation: str = "silu"
    interpret: bool = False  # megablox in Pallas interpret mode (any backend; slow: for tests)
    # The weights of its auxiliary losses in the training objective.
    balance_weight: float = 0.0
    z_weight: float = 0.0

    def receive_rows(self, assigned: int, shards: int) -> int:
        """Expert parallelism, dropless: the rows a device's experts can receive, of `assigned`
        rows routed on each of `shards` devices: all of them unless `receive_factor` bounds it."""
        if self.receive_factor is None:
            return shards * assigned
        return min(shards * assigned, math.ceil(self.receive_factor * assigned))

    def capacity(self, tokens: int) -> int:
        """Assignments each expert takes at most, with a capacity factor."""
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))


class Routing(NamedTuple):
    weights: jax.Array  # [tokens, k] the chosen experts' weights
    experts: jax.Array  # [tokens, k] int32 their indices
    probs: jax.Array  # [tokens, experts] the router's probabilities (sigmoid: scores normalised per token)


def route(logits: jax.Array, spec: MoESpec, bias: jax.Array | None = None) -> Routing:
    """The top-k experts of each token and their weights, from router logits [tokens, experts]
    (computed in float32)."""
    logits = logits.astype(jnp.float32)
    if spec.router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, spec.top_k)
        if spec.norm_top_k:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return Routing(weights, experts, probs)
    scores = jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if spec.groups > 1:
        tokens, count = choice.shape
        grouped = choice.reshape(tokens, spec.groups, count // spec.groups)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [tokens, groups]
        _, top_groups = jax.lax.top_k(group_scores, spec.top_groups)
        eligible = (
            jnp.zeros((tokens, spec.groups), bool).at[jnp.arange(tokens)[:, None], top_groups].set(True)
        )
        choice = jnp.where(jnp.repeat(eligible, count // spec.groups, axis=1), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, spec.top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if spec.norm_top_k:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return Routing(weights * spec.routed_scale, experts, probs)


def load_balance_loss(routing: Routing, num_experts: int) -> jax.Array:
    """Switch Transformer's balancing loss as Mixtral's trainer counts it: experts × Σ_e (the
    share of tokens that chose e among their k) · (e's mean router probability). It is k when
    routing is uniform, and grows as tokens crowd onto a few experts."""
    chosen = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), axis=1)  # [tokens, E]
    return num_experts * jnp.sum(jnp.mean(chosen, axis=0) * jnp.mean(routing.probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss: the mean squared log-sum-exp of the router logits, which keeps them
    small (float32)."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def expert_load(routing: Routing, num_experts: int) -> jax.Array:
    """[experts]: each expert's share of the assignments (sums to 1)."""
    counts = jnp.bincount(routing.experts.reshape(-1), length=num_experts)
    return counts / routing.experts.size


DYNAMIC_GRID = re.compile(r"dynamic_grid_at_most_(\d+)")


def dynamic_grid_scope(bound: int) -> str:
    """A name scope bounding the dynamic dimension of a Pallas kernel's grid (megablox's row
    tiles, which it visits only as far as the groups reach)."""
    return f"dynamic_grid_at_most_{bound}"


def _grouped(kernel: str, interpret: bool):
    """lhs [m, k] sorted by group, rhs [groups, k, n], group sizes [groups] → [m, n]."""
    if kernel == "megablox":
        from jax.experimental.pallas.ops.tpu.megablox import gmm

        def grouped(lhs, rhs, sizes):
            m, k, n = lhs.shape[0], lhs.shape[1], rhs.shape[2]
            tm = min(m, 128)
            padded = -(-m // tm) * tm  # the kernel takes whole row tiles; it skips those past the groups
            if padded != m:
                lhs = jnp.pad(lhs, ((0, padded - m), (0, 0)))
            # The kernel's grid visits a traced number of row tiles: at most every tile, which the
            # FLOP counter (`jaxlm.training.metrics.matmul_flops`) reads from this scope.
            with jax.named_scope(dynamic_grid_scope(padded // tm)):
                tiling = (tm, min(k, 128), min(n, 128))
                out = gmm(lhs, rhs, sizes, lhs.dtype, tiling, None, None, False, interpret)
            return out[:m]

        return grouped
    return lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=lhs.dtype)


def _expert_mlps(rows: jax.Array, w_gate, w_up, w_down, sizes: jax.Array, spec: MoESpec) -> jax.Array:
    """rows [m, embed] sorted by expert, `sizes[e]` of them expert e's (rows past their sum give
    zeros) → each row through its expert's gated MLP, [m, embed]."""
    grouped = _grouped(spec.kernel, spec.interpret)
    gate = checkpoint_name(grouped(rows, w_gate, sizes), "mlp_gate")
    up = checkpoint_name(grouped(rows, w_up, sizes), "mlp_up")
    return grouped(ACTIVATIONS[spec.activation](gate) * up, w_down, sizes)


def dropless(x: jax.Array, routing: Routing, w_gate, w_up, w_down, spec: MoESpec) -> jax.Array:
    """Every assignment computed: x [tokens, embed] → [tokens, embed]. The tokens' copies are
    sorted by expert, run through grouped matmuls, and put back."""
    return _dropless(x, routing, w_gate, w_up, w_down, spec)[0]


def _dropless(
    x: jax.Array, routing: Routing, w_gate, w_up, w_down, spec: MoESpec, layout: _Layout | None = None
) -> tuple[jax.Array, jax.Array]:
    """`dropless`, and the share of assignments dropped: none, except inside the layer's
    shard_map (`layout`) with experts split over devices, where the copies go to their experts'
    devices and back (`_exchanged`), and a `receive_factor` may drop some."""
    tokens, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=spec.num_experts).astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)  # [tokens·k, embed], grouped by expert
    if layout is None or layout.shards == 1:
        out, dropped = _expert_mlps(rows, w_gate, w_up, w_down, sizes, spec), jnp.zeros((), jnp.float32)
    else:
        out, dropped = _exchanged(rows, sizes, w_gate, w_up, w_down, spec, layout)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(tokens, k, -1)
    return jnp.einsum("tkd,tk->td", unsorted, routing.weights.astype(x.dtype)), dropped


def _exchanged(
    rows, sizes, w_gate, w_up, w_down, spec: MoESpec, layout: _Layout
) -> tuple[jax.Array, jax.Array]:
    """Expert parallelism on one device of the shard_map: rows [a, embed] sorted by expert
    (`sizes` per expert) → (their experts' outputs, computed where the experts live; the share
    of rows dropped).

    Each device sends every other the block of rows for its experts, and receives the blocks of
    rows for its own, one source after another, in a buffer of `receive_rows` (the worst case,
    every row of every device to it, unless `spec.receive_factor` bounds it: then the rows past
    its end are dropped, their outputs zero); it groups them by its local expert, runs the
    grouped matmuls, and sends the outputs back, which land in the rows' sorted order. The
    blocks' sizes and places come from the matrix of row counts, all-gathered first."""
    assigned, width = rows.shape
    shards, here = layout.shards, spec.num_experts // layout.shards
    buffer_rows = spec.receive_rows(assigned, shards)
    me = jax.lax.axis_index(layout.expert_axes)
    per_shard = sizes.reshape(shards, here)  # my rows for each device's experts
    counts = layout.exchange(per_shard)  # [source, here]: the rows each device sends me, per expert
    matrix = jax.lax.all_gather(jnp.sum(per_shard, axis=1), layout.expert_axes, tiled=False)  # [from, to]
    landing = jnp.cumsum(matrix, axis=0) - matrix  # where each block lands on its receiver
    kept = jnp.clip(buffer_rows - landing, 0, matrix)  # of each block, the rows that fit there
    sent, received = kept[me], kept[:, me]
    start = (jnp.cumsum(matrix, axis=1) - matrix)[me]  # where each device's block starts in my rows
    arrived = landing[:, me]  # where each source's block lands on me
    buffer = layout.ragged_exchange(
        rows, jnp.zeros((buffer_rows, width), rows.dtype), start, sent, landing[me], received
    )
    # The local expert of each received row (each source's block sorted by expert, and cut
    # where the buffer ends); `here`: unused.
    place = jnp.arange(buffer_rows)
    source = jnp.minimum(jnp.searchsorted(jnp.cumsum(received), place, side="right"), shards - 1)
    within = place - arrived[source]
    local = jnp.sum(within[:, None] >= jnp.cumsum(counts, axis=1)[source], axis=1)
    local = jnp.where(place < jnp.sum(received), local, here)
    by_expert = jnp.argsort(local, stable=True)
    group_sizes = jnp.bincount(local, length=here + 1)[:here].astype(jnp.int32)
    out = _expert_mlps(jnp.take(buffer, by_expert, axis=0), w_gate, w_up, w_down, group_sizes, spec)
    out = jnp.zeros_like(out).at[by_expert].set(out)
    # Back: each source's block from where it arrived to where it started.
    back_to = (jnp.cumsum(matrix, axis=1) - matrix)[:, me]  # where my experts' rows started on each source
    out = layout.ragged_exchange(out, jnp.zeros_like(rows), arrived, received, back_to, sent)
    return out, (assigned - jnp.sum(sent)).astype(jnp.float32) / assigned


def with_capacity(
    x: jax.Array, routing: Routing, w_gate, w_up, w_down, spec: MoESpec, layout: _Layout | None = None
) -> tuple[jax.Array, jax.Array]:
    """At most `spec.capacity(tokens)` assignments per expert, first choices first, then by
    token: x [tokens, embed] → ([tokens, embed], the share of assignments dropped). Inside the
    layer's shard_map (`layout`) the capacity is each device's, of its own tokens (as GShard's
    groups), and the [experts, capacity] buffer goes to the experts' devices by all-to-all."""
    tokens, k = routing.experts.shape
    capacity = spec.capacity(tokens)
    by_choice = routing.experts.T.reshape(-1)  # [k·tokens]: every first choice, then every second
    one_hot = jax.nn.one_hot(by_choice, spec.num_experts, dtype=jnp.int32)
    slot = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # place in its expert's queue
    kept = slot < capacity
    token = jnp.tile(jnp.arange(tokens), k)
    # Dropped assignments go to slot `capacity`, out of bounds, which the scatter drops.
    slots = jnp.where(kept, slot, capacity)
    buffer = jnp.zeros((spec.num_experts, capacity, x.shape[-1]), x.dtype)
    buffer = buffer.at[by_choice, slots].set(jnp.take(x, token, axis=0), mode="drop")
    shards = 1 if layout is None else layout.shards
    if shards > 1:  # [experts, capacity] → [local experts, shards · capacity], and back after
        exchange = layout.exchange
        here = spec.num_experts // shards
        buffer = exchange(buffer.reshape(shards, here, capacity, -1)).transpose(1, 0, 2, 3)
        buffer = buffer.reshape(here, shards * capacity, -1)
    gate = checkpoint_name(jnp.einsum("ecd,edm->ecm", buffer, w_gate), "mlp_gate")
    up = checkpoint_name(jnp.einsum("ecd,edm->ecm", buffer, w_up), "mlp_up")
    out = jnp.einsum("ecm,emd->ecd", ACTIVATIONS[spec.activation](gate) * up, w_down)
    if shards > 1:
        out = out.reshape(here, shards, capacity, -1).transpose(1, 0, 2, 3)
        out = exchange(out).reshape(spec.num_experts, capacity, -1)
    taken = out.at[by_choice, slots].get(mode="fill", fill_value=0)  # [k·tokens, embed]
    weights = routing.weights.T.reshape(-1).astype(x.dtype) * kept
    y = jnp.zeros_like(x).at[token].add(taken * weights[:, None])
    return y, 1.0 - jnp.mean(kept.astype(jnp.float32))


class _Layout:
    """How the routed experts split over the mesh inside their shard_map, by the logical-axis
    rules: tokens [batch, length, ...] as the activations (a dimension its axes do not divide
    stays whole, as `parallel.constrain` leaves it), the experts' weights by `expert` and their
    hidden width by `expert_mlp` (partial sums, added over those axes at the end)."""

    def __init__(self, x_shape, spec: MoESpec, mesh: Mesh, rules: parallel.Rules):
        self.mesh = mesh
        batch, length, _ = parallel.logical_to_spec(("batch", "length", None), rules)
        batch, length = self._dividing(batch, x_shape[0]), self._dividing(length, x_shape[1])
        expert, _, mlp = parallel.logical_to_spec(("expert", None, "expert_mlp"), rules)
        expert, mlp = self._dividing(expert, spec.num_experts), self._dividing(mlp, spec.expert_dim)
        self.token_axes = _names(batch) + _names(length)
        if set(_names(mlp)) & set(self.token_axes):  # a width split where tokens are too: gather it
            mlp = None
        self.expert_axes, self.mlp_axes = _names(expert), _names(mlp)
        self.shards = self._size(expert)
        self.tokens = PartitionSpec(batch, length, None)
        self.w_in = PartitionSpec(expert, None, mlp)
        self.w_out = PartitionSpec(expert, mlp, None)

    def exchange(self, blocks: jax.Array) -> jax.Array:
        """All-to-all over the expert axes: block i [shards, ...] to device i, which gets each
        device's block in order."""
        return jax.lax.all_to_all(blocks, self.expert_axes, 0, 0, tiled=True)

    def ragged_exchange(self, rows, output, offsets, sizes, output_offsets, receive_sizes) -> jax.Array:
        """`jax.lax.ragged_all_to_all` over the expert axes: rows[offsets[i]:][:sizes[i]] to
        device i, at output_offsets[i] of its `output`. XLA:CPU has no ragged all-to-all: there,
        blocks of the worst case's size (every row) travel by plain all-to-all, the same result."""
        if self.mesh.devices.flat[0].platform in ("gpu", "cuda", "rocm", "tpu"):
            return jax.lax.ragged_all_to_all(
                rows, output, offsets, sizes, output_offsets, receive_sizes, axis_name=self.expert_axes
            )
        count = min(rows.shape[0], output.shape[0])  # no block is longer than a receiver's output
        place = jnp.arange(count)
        blocks = jnp.take(rows, jnp.minimum(offsets[:, None] + place, rows.shape[0] - 1), axis=0)
        blocks = jnp.where((place < sizes[:, None])[..., None], blocks, 0)  # [shards, count, ...]
        arrived, at = self.exchange(blocks), self.exchange(output_offsets[:, None])[:, 0]
        index = jnp.where(place < receive_sizes[:, None], at[:, None] + place, output.shape[0])
        return output.at[index.reshape(-1)].set(arrived.reshape(-1, *rows.shape[1:]), mode="drop")

    def _size(self, axes) -> int:
        return parallel.axis_size(self.mesh, axes)

    def _dividing(self, axes, dim: int):
        return axes if dim % self._size(axes) == 0 else None


def _names(axes) -> tuple[str, ...]:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def sharded_experts(
    x: jax.Array, routing: Routing, w_gate, w_up, w_down, spec: MoESpec, mesh: Mesh, rules: parallel.Rules
) -> tuple[jax.Array, jax.Array]:
    """`dropless` or `with_capacity` on a mesh: x [batch, length, embed] and its routing
    ([batch, length, k]) → (y like x, the share of assignments dropped), in a shard_map where
    each device routes its own tokens and, with `expert` split over devices, exchanges them with
    the experts' devices by all-to-all."""
    layout = _Layout(x.shape, spec, mesh, rules)
    routed = PartitionSpec(*layout.tokens[:2], None)

    def local(x, weights, experts, w_gate, w_up, w_down):
        batch, length, d = x.shape
        routing = Routing(weights.reshape(batch * length, -1), experts.reshape(batch * length, -1), None)
        flat = x.reshape(batch * length, d)
        expert_parallel = _dropless if spec.capacity_factor is None else with_capacity
        y, dropped = expert_parallel(flat, routing, w_gate, w_up, w_down, spec, layout)
        if layout.token_axes:
            dropped = jax.lax.pmean(dropped, layout.token_axes)
        if layout.mlp_axes:
            y = jax.lax.psum(y, layout.mlp_axes)
        return y.reshape(batch, length, d), dropped

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(layout.tokens, routed, routed, layout.w_in, layout.w_in, layout.w_out),
        out_specs=(layout.tokens, PartitionSpec()),
        check_vma=False,
    )
    batch, length, _ = x.shape
    weights, experts = (a.reshape(batch, length, -1) for a in (routing.weights, routing.experts))
    return run(x, weights.astype(x.dtype), experts, w_gate, w_up, w_down)


class MoEOutput(NamedTuple):
    y: jax.Array  # like x
    aux_losses: dict[str, jax.Array]  # load_balance, router_z: unweighted, for the family to weigh
    load: jax.Array  # [experts] each expert's share of the assignments
    dropped: jax.Array  # share of assignments dropped (0 dropless)


class MoE(nnx.Module):
    """The router, `num_experts` gated MLPs stacked on an `expert` axis, and the shared experts'
    gated MLP. Parameters: router [embed, experts]; w_gate, w_up [experts, embed, expert_dim];
    w_down [experts, expert_dim, embed]; shared_* as the dense MLP's; with a sigmoid router, the
    balancing bias [experts] (not trained by gradients)."""

    def __init__(self, d_model: int, spec: MoESpec, rngs: nnx.Rngs, init_std: float, out_std: float, dtype):
        e, m = spec.num_experts, spec.expert_dim
        self.spec = spec
        self.router = param(rngs, (d_model, e), ("embed", None), init_std, dtype)
        self.w_gate = param(rngs, (e, d_model, m), ("expert", "embed", "expert_mlp"), init_std, dtype)
        self.w_up = param(rngs, (e, d_model, m), ("expert", "embed", "expert_mlp"), init_std, dtype)
        self.w_down = param(rngs, (e, m, d_model), ("expert", "expert_mlp", "embed"), out_std, dtype)
        if spec.router == "sigmoid":
            self.router_bias = RouterBias(
                jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False
            )
        if spec.shared_dim:
            s = spec.shared_dim
            self.shared_gate = param(rngs, (d_model, s), ("embed", "mlp"), init_std, dtype)
            self.shared_up = param(rngs, (d_model, s), ("embed", "mlp"), init_std, dtype)
            self.shared_down = param(rngs, (s, d_model), ("mlp", "embed"), out_std, dtype)

    def __call__(self, x: jax.Array) -> MoEOutput:
        """x [batch, length, embed] → `MoEOutput`."""
        spec, dt = self.spec, x.dtype
        batch, length, d = x.shape
        flat = x.reshape(batch * length, d)
        logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # [tokens, experts]
        bias = self.router_bias[...] if spec.router == "sigmoid" else None
        routing = route(logits, spec, bias)
        weights = [getattr(self, name)[...].astype(dt) for name in ("w_gate", "w_up", "w_down")]
        context = parallel.activation_context()
        if context is not None and context[0].size > 1:
            y, dropped = sharded_experts(x, routing, *weights, spec, *context)
            y = y.reshape(batch * length, d)
        elif spec.capacity_factor is None:
            y, dropped = dropless(flat, routing, *weights, spec), jnp.zeros((), jnp.float32)
        else:
            y, dropped = with_capacity(flat, routing, *weights, spec)
        if spec.shared_dim:
            gate, up = flat @ self.shared_gate[...].astype(dt), flat @ self.shared_up[...].astype(dt)
            y = y + (ACTIVATIONS[spec.activation](gate) * up) @ self.shared_down[...].astype(dt)
        aux = {
            "load_balance": load_balance_loss(routing, spec.num_experts),
            "router_z": router_z_loss(logits),
        }
        return MoEOutput(y.reshape(batch, length, d), aux, expert_load(routing, spec.num_experts), dropped)


class RouterBias(nnx.Param):
    """The sigmoid router's per-expert balancing bias (DeepSeek-V3's e_score_correction_bias): it
    shifts which experts are chosen, not their weights, so it gets no gradient (and no weight
    decay); the train step moves it toward balance after every step (`balanced_bias`)."""


def balanced_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's auxiliary-loss-free balancing: each expert's bias [..., experts] up by `rate`
    where the step gave it less than an even share of the assignments (`load`, shares per layer),
    down where more, unchanged where exactly even."""
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load).astype(bias.dtype)
