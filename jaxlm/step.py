"""The pure core of training: the loss, the train step and the eval step, functions of pytrees.

Nothing here touches devices, files or the clock; `jaxlm.train` jits these onto a mesh and runs
them in its loop.
"""

from __future__ import annotations

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


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nested dict of arrays, the model's nnx.Param values
    opt_state: Any


def next_token_loss(
    hidden: jax.Array,
    output_projection: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    chunk: int = 0,
):
    """Sum of token cross-entropies (float32) and the number of real (non-padding) targets.

    hidden: [batch, length, embed]; output_projection: [embed, vocab]. Logits stay in the compute
    dtype; with `chunk` > 0 they exist `chunk` positions at a time (recomputed in the backward
    pass), so a large vocabulary never holds [batch, length, vocab] in memory at once.
    """
    mask = segment_ids > 0  # [batch, length]

    def chunk_loss(hidden, targets, mask):
        logits = jnp.einsum("bte,ev->btv", hidden, output_projection)  # [batch, chunk, vocab]
        logits = parallel.constrain(logits, ("batch", "length", "act_vocab"))
        log_normaliser = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
        return jnp.sum((log_normaliser - target_logits) * mask)

    length = hidden.shape[1]
    if not chunk or chunk >= length:
        return chunk_loss(hidden, targets, mask), jnp.sum(mask)

    def by_chunk(x):  # [batch, length, ...] → [length / chunk, batch, chunk, ...]
        return jnp.swapaxes(x.reshape(x.shape[0], length // chunk, chunk, *x.shape[2:]), 0, 1)

    def accumulate(total, chunk_inputs):
        return total + jax.checkpoint(chunk_loss)(*chunk_inputs), None

    total, _ = jax.lax.scan(
        accumulate, jnp.zeros((), jnp.float32), (by_chunk(hidden), by_chunk(targets), by_chunk(mask))
    )
    return total, jnp.sum(mask)


def _loss_fn(graphdef: nnx.GraphDef, params, batch, loss_chunk: int = 0):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])  # [batch, length, embed]
    return next_token_loss(
        hidden, model.output_projection(), batch["targets"], batch["segment_ids"], loss_chunk
    )


def make_train_step(
    graphdef, optimizer, schedule, micro_batches: int, mesh: Mesh, rules, loss_chunk: int = 0
) -> Callable:
    """(state, batch) → (state, metrics). The loss is the mean over the batch's real target
    tokens: each micro-batch's summed loss is divided by the whole batch's token count (known
    from the batch before any forward pass), so gradients summed over `micro_batches` are the
    mean gradient whatever the accumulation."""

    def mean_loss(params, batch, denominator):
        loss_sum, _ = _loss_fn(graphdef, params, batch, loss_chunk)
        return loss_sum / denominator

    grad_fn = jax.value_and_grad(mean_loss)

    def loss_and_grads(params, batch, denominator):
        if micro_batches == 1:
            return grad_fn(params, batch, denominator)

        def split(x):  # [batch, length] → [micro, batch / micro, length], rows strided so every
            # micro-batch keeps rows on every data-parallel device (no resharding).
            x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
            x = parallel.constrain(x, ("batch", None, "length"))
            return jnp.swapaxes(x, 0, 1)

        def accumulate(carry, micro_batch):
            loss, grads = carry
            micro_loss, micro_grads = grad_fn(params, micro_batch, denominator)
            return (loss + micro_loss, jax.tree.map(jnp.add, grads, micro_grads)), None

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(accumulate, init, jax.tree.map(split, batch))
        return loss, grads

    def train_step(state: TrainState, batch):
        denominator = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)
        with parallel.activation_sharding(mesh, rules):
            loss, grads = loss_and_grads(state.params, batch, denominator)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(graphdef, token_bytes: np.ndarray, mesh: Mesh, rules, loss_chunk: int = 0) -> Callable:
    """params, batch → (sum of losses in nats, target tokens, target bytes)."""
    token_bytes = jnp.asarray(token_bytes)

    def eval_step(params, batch):
        with parallel.activation_sharding(mesh, rules):
            loss_sum, count = _loss_fn(graphdef, params, batch, loss_chunk)
        byte_count = jnp.sum(token_bytes[batch["targets"]] * (batch["segment_ids"] > 0))
        return loss_sum, count, byte_count

    return eval_step
