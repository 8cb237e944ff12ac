"""The output projection and cross-entropy, forward and backward, whole and in chunks of positions.

Times jax.value_and_grad of the summed loss with respect to the hidden states and the output
projection, jitted, on this machine's first device (median of --iters after a warm-up):

- whole: `jaxlm.training.step.next_token_loss` with chunk 0: [batch, length, vocab] logits at once;
- chunked: the same with chunk --chunk: `jaxlm.training.step.chunked_cross_entropy`, each chunk's
  gradients computed with its loss;
- chunked_remat: chunks under jax.checkpoint instead (the logits recomputed in the backward
  pass), the usual way to chunk, for comparison.

Prints one JSON line: milliseconds and the loss of each (they must agree).

    python bench/cross_entropy.py --batch 4 --length 512 --embed 256 --vocab 32768 --chunk 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxlm.model.registry import OutputHead
from jaxlm.training.step import _by_chunk, next_token_loss, project_logits, token_losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (args.batch, args.length, args.embed), dtype)
    weight = (0.02 * jax.random.normal(keys[1], (args.embed, args.vocab), jnp.float32)).astype(dtype)
    targets = jax.random.randint(keys[2], (args.batch, args.length), 0, args.vocab)
    loss_mask = jnp.ones((args.batch, args.length), jnp.int32)

    def chunked_remat(hidden, weight):
        def chunk_loss(h, t):
            return jnp.sum(token_losses(project_logits(h, OutputHead(weight)), t))

        def add(total, inputs):
            return total + jax.checkpoint(chunk_loss)(*inputs), None

        chunks = (_by_chunk(hidden, args.chunk), _by_chunk(targets, args.chunk))
        return jax.lax.scan(add, jnp.zeros((), jnp.float32), chunks)[0]

    variants = {
        "whole": lambda h, w: next_token_loss(h, OutputHead(w), targets, loss_mask, 0)[0],
        "chunked": lambda h, w: next_token_loss(h, OutputHead(w), targets, loss_mask, args.chunk)[0],
        "chunked_remat": chunked_remat,
    }
    figures: dict = {"shape": vars(args), "device": jax.devices()[0].device_kind}
    for name, loss in variants.items():
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        value, _ = jax.block_until_ready(step(hidden, weight))
        seconds = []
        for _ in range(args.iters):
            started = time.perf_counter()
            jax.block_until_ready(step(hidden, weight))
            seconds.append(time.perf_counter() - started)
        figures[name] = {"ms": statistics.median(seconds) * 1e3, "loss": float(value)}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
