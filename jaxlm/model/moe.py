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
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

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
    kernel: str = "ragged_dot"  # ragged_dot or megablox (a resolved `KERNELS` entry)
    activation: str = "silu"
    interpret: bool = False  # megablox in Pallas interpret mode (any backend; slow: for tests)
    # The weights of its auxiliary losses in the training objective.
    balance_weight: float = 0.0
    z_weight: float = 0.0

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


def _grouped(kernel: str, interpret: bool):
    """lhs [m, k] sorted by group, rhs [groups, k, n], group sizes [groups] → [m, n]."""
    if kernel == "megablox":
        from jax.experimental.pallas.ops.tpu.megablox import gmm

        def grouped(lhs, rhs, sizes):
            m, k, n = lhs.shape[0], lhs.shape[1], rhs.shape[2]
            tiling = (min(m, 128), min(k, 128), min(n, 128))
            return gmm(lhs, rhs, sizes, lhs.dtype, tiling, None, None, False, interpret)

        return grouped
    return lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=lhs.dtype)


def dropless(x: jax.Array, routing: Routing, w_gate, w_up, w_down, spec: MoESpec) -> jax.Array:
    """Every assignment computed: x [tokens, embed] → [tokens, embed]. The tokens' copies are
    sorted by expert, run through grouped matmuls, and put back."""
    tokens, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=spec.num_experts).astype(jnp.int32)
    grouped = _grouped(spec.kernel, spec.interpret)
    rows = jnp.take(x, order // k, axis=0)  # [tokens·k, embed], grouped by expert
    gate = checkpoint_name(grouped(rows, w_gate, sizes), "mlp_gate")
    up = checkpoint_name(grouped(rows, w_up, sizes), "mlp_up")
    out = grouped(ACTIVATIONS[spec.activation](gate) * up, w_down, sizes)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(tokens, k, -1)
    return jnp.einsum("tkd,tk->td", unsorted, routing.weights.astype(x.dtype))


def with_capacity(
    x: jax.Array, routing: Routing, w_gate, w_up, w_down, spec: MoESpec
) -> tuple[jax.Array, jax.Array]:
    """At most `spec.capacity(tokens)` assignments per expert, first choices first, then by
    token: x [tokens, embed] → ([tokens, embed], the share of assignments dropped)."""
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
    gate = checkpoint_name(jnp.einsum("ecd,edm->ecm", buffer, w_gate), "mlp_gate")
    up = checkpoint_name(jnp.einsum("ecd,edm->ecm", buffer, w_up), "mlp_up")
    out = jnp.einsum("ecm,emd->ecd", ACTIVATIONS[spec.activation](gate) * up, w_down)
    taken = out.at[by_choice, slots].get(mode="fill", fill_value=0)  # [k·tokens, embed]
    weights = routing.weights.T.reshape(-1).astype(x.dtype) * kept
    y = jnp.zeros_like(x).at[token].add(taken * weights[:, None])
    return y, 1.0 - jnp.mean(kept.astype(jnp.float32))


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
        if spec.capacity_factor is None:
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


class RouterBias(nnx.Variable):
    """The sigmoid router's per-expert balancing bias (DeepSeek-V3's e_score_correction_bias): it
    shifts which experts are chosen, not their weights, and is moved toward balance between steps,
    not by gradients."""
