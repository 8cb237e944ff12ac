"""The pure core of training: the loss, the train step and the eval step, functions of pytrees.

Nothing here touches devices, files or the clock; `jaxlm.training.setup` jits these onto a mesh and
`jaxlm.training.train` runs them in its loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlm import parallel
from jaxlm.model import moe
from jaxlm.model.decoder import EXPERT_LOAD
from jaxlm.model.lora import combine
from jaxlm.model.registry import OutputHead
from jaxlm.training import lora


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nested dict of arrays, the model's nnx.Param values (with LoRA, adapters too)
    opt_state: Any  # of the trained parameters only: with LoRA, the adapters


def next_token_loss(
    hidden: jax.Array,
    head: OutputHead,
    targets: jax.Array,
    loss_mask: jax.Array,
    chunk: int = 0,
):
    """Sum of the token cross-entropies (float32) weighted by `loss_mask`, and the sum of the mask
    (the number of trained targets).

    hidden: [batch, length, embed]; head: the model's `output_head()`; targets, loss_mask: [batch,
    length]. Logits stay in the compute dtype. With `chunk` > 0 they exist `chunk` positions at
    a time, and the gradients of each chunk are computed with its loss (`chunked_cross_entropy`),
    so a large vocabulary never holds [batch, length, vocab] in memory at once and nothing is
    recomputed.
    """
    mask = loss_mask.astype(jnp.float32)  # [batch, length]
    length = hidden.shape[1]
    if not chunk or chunk >= length:
        logits = project_logits(hidden, head)
        return jnp.sum(token_losses(logits, targets) * mask), jnp.sum(mask)
    return chunked_cross_entropy(hidden, head.weight, targets, mask, chunk, head.softcap), jnp.sum(mask)


def project_logits(hidden: jax.Array, head: OutputHead) -> jax.Array:
    return parallel.constrain(
        head.logits(hidden), ("batch", "length", "act_vocab")
    )  # [batch, positions, vocab]


def _log_normaliser_and_target_logits(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[batch, positions, 1] float32 each; the log-sum-exp upcasts inside its reduction."""
    log_normaliser = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1, keepdims=True)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1).astype(jnp.float32)
    return log_normaliser, target_logits


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[batch, positions] float32 cross-entropies: the negated log-probabilities of the targets."""
    log_normaliser, target_logits = _log_normaliser_and_target_logits(logits, targets)
    return (log_normaliser - target_logits)[..., 0]


def _by_chunk(x: jax.Array, chunk: int) -> jax.Array:
    """[batch, length, ...] → [length / (shards × chunk), batch, shards × chunk, ...]: each
    scanned chunk takes `chunk` positions from each of the context shards' parts of the row, so
    the scan never walks along the split sequence (the loss is a sum: any order will do)."""
    shards = parallel.context_shards()
    batch, length, rest = x.shape[0], x.shape[1], x.shape[2:]
    x = x.reshape(batch, shards, length // (shards * chunk), chunk, *rest)
    return jnp.moveaxis(x, 2, 0).reshape(length // (shards * chunk), batch, shards * chunk, *rest)


def _chunks(hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int) -> tuple[jax.Array, ...]:
    """The scanned inputs of the chunked loss: each split into chunks of `chunk` positions."""
    return _by_chunk(hidden, chunk), _by_chunk(targets, chunk), _by_chunk(mask, chunk)


def _from_chunks(x: jax.Array) -> jax.Array:
    """The inverse of `_by_chunk`."""
    shards = parallel.context_shards()
    count, batch, width, rest = x.shape[0], x.shape[1], x.shape[2], x.shape[3:]
    x = jnp.moveaxis(x.reshape(count, batch, shards, width // shards, *rest), 0, 2)
    return x.reshape(batch, count * width, *rest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunked_cross_entropy(
    hidden, weight, targets, mask, chunk: int, softcap: float | None = None
) -> jax.Array:
    """Sum over real targets of the cross-entropy of `hidden @ weight` (soft-capped at `softcap`,
    if given), `chunk` positions at a time. Differentiated, each chunk's gradients are computed
    right after its loss, while its logits exist (the loss is the last thing the step computes,
    so its cotangent is a scalar applied afterwards): no second pass over the output projection,
    unlike jax.checkpoint."""
    head = OutputHead(weight, softcap)

    def add_chunk(total, inputs):
        h, t, m = inputs
        return total + jnp.sum(token_losses(project_logits(h, head), t) * m), None

    total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), _chunks(hidden, targets, mask, chunk))
    return total


def _chunked_cross_entropy_fwd(hidden, weight, targets, mask, chunk, softcap):
    vocab = weight.shape[1]
    head = OutputHead(weight, softcap)

    def add_chunk(carry, inputs):
        total, d_weight = carry
        h, t, m = inputs
        logits = project_logits(h, head)
        log_normaliser, target_logits = _log_normaliser_and_target_logits(logits, t)
        total = total + jnp.sum((log_normaliser - target_logits)[..., 0] * m)
        # d loss / d logits = softmax − one-hot(target), on real targets only.
        is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
        d_logits = jnp.exp(logits.astype(jnp.float32) - log_normaliser) - is_target
        if softcap is not None:  # through cap·tanh(x / cap): × (1 − tanh²) = 1 − (logits / cap)²
            d_logits = d_logits * (1 - jnp.square(logits.astype(jnp.float32) / softcap))
        d_logits = (d_logits * m[..., None]).astype(logits.dtype)
        d_logits = parallel.constrain(d_logits, ("batch", "length", "act_vocab"))
        d_hidden = jnp.einsum("btv,ev->bte", d_logits, weight)
        d_weight = d_weight + jnp.einsum("bte,btv->ev", h, d_logits, preferred_element_type=jnp.float32)
        return (total, d_weight), d_hidden

    init = (jnp.zeros((), jnp.float32), jnp.zeros((weight.shape[0], vocab), jnp.float32))
    (total, d_weight), d_hidden = jax.lax.scan(add_chunk, init, _chunks(hidden, targets, mask, chunk))
    return total, (_from_chunks(d_hidden), d_weight.astype(weight.dtype))


def _chunked_cross_entropy_bwd(chunk, softcap, residuals, cotangent):
    d_hidden, d_weight = residuals
    return (
        (d_hidden * cotangent).astype(d_hidden.dtype),
        (d_weight * cotangent).astype(d_weight.dtype),
        None,
        None,
    )


chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd)


def context_layout(batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], np.ndarray | None]:
    """The batch's [batch, length] rows laid out for the context parallelism of the sharding
    context (`parallel.load_balanced_order`), and that order (None without context parallelism:
    rows as they are). Only integer rows move; the loss, a sum over positions, needs no undoing."""
    shards = parallel.context_shards()
    if shards == 1:
        return batch, None
    order = parallel.load_balanced_order(batch["tokens"].shape[1], shards)
    indices = jnp.asarray(order, jnp.int32)
    laid_out = {
        name: parallel.constrain(jnp.take(rows, indices, axis=1), ("batch", "length"))
        for name, rows in batch.items()
    }
    return laid_out, order


def _loss_fn(graphdef: nnx.GraphDef, params, batch, loss_chunk: int = 0, dropout_key=None):
    """The batch's summed token losses, its count of trained targets, the model's auxiliary
    losses and its metrics (each name → scalar)."""
    model = nnx.merge(graphdef, params)
    dropout = {} if dropout_key is None else {"dropout_key": dropout_key}  # LoRA's, in training
    batch, order = context_layout(batch)
    layout = {} if order is None else {"order": order}  # context parallelism's
    output = model(
        batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True, **layout, **dropout
    )
    loss_sum, count = next_token_loss(
        output.hidden, model.output_head(), batch["targets"], batch["loss_mask"], loss_chunk
    )
    return loss_sum, count, output.aux_losses, output.metrics


def _all_trained(params):
    return params, {}


def make_train_step(
    graphdef,
    optimizer,
    schedule,
    micro_batches: int,
    mesh: Mesh,
    rules,
    loss_chunk: int = 0,
    trainable: Callable = _all_trained,
    dropout_seed: int | None = None,
    offloaded_opt_state: tuple[Callable, Callable] | None = None,
    bias_update_rate: float = 0.0,
) -> Callable:
    """(state, batch) → (state, metrics). The loss is the mean over the batch's trained targets
    (`loss_mask`): each micro-batch's summed loss is divided by the whole batch's count of them
    (known from the batch before any forward pass), so gradients summed over `micro_batches` are
    the mean gradient whatever the accumulation.

    trainable: params → (trained, frozen), two nested dicts: only the trained ones are
    differentiated and updated (with LoRA, the adapters). dropout_seed: train.seed, when the
    model has dropout (LoRA's); each step and micro-batch draws its own key from it.
    offloaded_opt_state: for an optimizer state kept in host memory (optim.offload_state), the
    functions that move it into device memory for the update and back out. bias_update_rate:
    after the update, the sigmoid routers' balancing biases move by this toward balance, by the
    step's per-expert load (DeepSeek-V3's; `moe.balanced_bias`)."""

    def objective(trained, frozen, batch, denominator, key):
        """What is differentiated: this (micro-)batch's share of the mean token loss plus its share
        of the auxiliary losses; with (token loss, auxiliary losses and metrics) as its aux (each
        of those a share, so that the micro-batches' sum is their mean)."""
        loss_sum, _, aux_losses, metrics = _loss_fn(
            graphdef, combine(trained, frozen), batch, loss_chunk, key
        )
        loss = loss_sum / denominator
        aux_losses = {name: value / micro_batches for name, value in aux_losses.items()}
        total = loss + sum(aux_losses.values()) if aux_losses else loss
        metrics = {name: value / micro_batches for name, value in metrics.items()}
        return total, (loss, (aux_losses, metrics))

    objective_and_grad = jax.value_and_grad(objective, has_aux=True)

    def grad_fn(params, frozen, batch, denominator, key):
        (_, losses), grads = objective_and_grad(params, frozen, batch, denominator, key)
        return losses, grads

    def loss_and_grads(params, frozen, batch, denominator, key):
        """((token loss, auxiliary losses), gradients) of the whole batch."""
        if micro_batches == 1:
            return grad_fn(params, frozen, batch, denominator, key)

        def split(x):  # [batch, length] → [micro, batch / micro, length], rows strided so every
            # micro-batch keeps rows on every data-parallel device (no resharding).
            x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
            x = parallel.constrain(x, ("batch", None, "length"))
            return jnp.swapaxes(x, 0, 1)

        def accumulate(carry, micro):
            loss, grads = carry
            index, micro_batch = micro
            micro_key = None if key is None else jax.random.fold_in(key, index)
            (micro_loss, aux_losses), micro_grads = grad_fn(
                params, frozen, micro_batch, denominator, micro_key
            )
            return (loss + micro_loss, jax.tree.map(jnp.add, grads, micro_grads)), aux_losses

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        micro = (jnp.arange(micro_batches), jax.tree.map(split, batch))
        (loss, grads), aux_losses = jax.lax.scan(accumulate, init, micro)
        return (loss, jax.tree.map(lambda x: jnp.sum(x, axis=0), aux_losses)), grads

    def train_step(state: TrainState, batch):
        trained_tokens = jnp.sum(batch["loss_mask"])
        denominator = jnp.maximum(trained_tokens, 1).astype(jnp.float32)
        trained, frozen = trainable(state.params)
        key = None if dropout_seed is None else lora.dropout_key(dropout_seed, state.step)
        with parallel.activation_sharding(mesh, rules):
            (loss, (aux_losses, model_metrics)), grads = loss_and_grads(
                trained, frozen, batch, denominator, key
            )
        grad_norm = optax.tree.norm(grads)
        if offloaded_opt_state is None:
            trained, opt_state = _optimizer_step(optimizer, grads, state.opt_state, trained)
        else:
            trained, opt_state = _offloaded_optimizer_step(
                optimizer, offloaded_opt_state, grads, state.opt_state, trained, grad_norm
            )
        load = model_metrics.pop(EXPERT_LOAD, None)
        if load is not None and bias_update_rate:
            trained = _balance_router_biases(trained, load, bias_update_rate)
        params = combine(trained, frozen)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "trained_tokens": trained_tokens,
            **{f"aux/{name}": value for name, value in aux_losses.items()},
            **model_metrics,
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def _balance_router_biases(trained, load: jax.Array, rate: float):
    """The trained parameters with the experts' stack's router biases [layers, experts] moved
    toward balance by the step's `load` (a stack of dense first layers has none)."""

    def update(path, value):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        return moe.balanced_bias(value, load, rate) if name == "blocks.mlp.router_bias" else value

    return jax.tree_util.tree_map_with_path(update, trained)


def _optimizer_step(optimizer, grads, opt_state, trained) -> tuple[Any, Any]:
    """The optimizer's update applied: (updated trained parameters, new optimizer state)."""
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state


def _offloaded_optimizer_step(optimizer, moves, grads, opt_state, trained, grad_norm) -> tuple[Any, Any]:
    """`_optimizer_step` on a state kept in host memory: `moves` (to device, to host) bring it
    into device memory for the update and put the new state back."""
    to_device, to_host = moves

    def in_device_memory(grads, opt_state, trained):
        trained, opt_state = _optimizer_step(optimizer, grads, to_device(opt_state), trained)
        return trained, to_host(opt_state)

    # Both branches are the same update: the condition on the gradients only holds the copy of
    # the state into device memory back until the backward pass is done (XLA would start it with
    # the step, and an optimization barrier on host arrays does not hold it).
    return jax.lax.cond(
        jnp.isfinite(grad_norm), in_device_memory, in_device_memory, grads, opt_state, trained
    )


def make_eval_step(graphdef, token_bytes: np.ndarray, mesh: Mesh, rules, loss_chunk: int = 0) -> Callable:
    """params, batch → (sum of losses in nats, trained targets, their bytes), each weighted by
    `loss_mask`."""
    token_bytes = jnp.asarray(token_bytes)

    def eval_step(params, batch):
        with parallel.activation_sharding(mesh, rules):
            loss_sum, count, *_ = _loss_fn(graphdef, params, batch, loss_chunk)
        byte_count = jnp.sum(token_bytes[batch["targets"]] * batch["loss_mask"])
        return loss_sum, count, byte_count

    return eval_step
