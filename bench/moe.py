"""What a mixture-of-experts layer costs, alone: the forward and backward pass of `moe.MoE`'s
experts (routing given) for each way of computing them, on one device, one JSON line each:

- `ragged_dot`: dropless, the assignments sorted by expert through `jax.lax.ragged_dot`;
- `capacity`: fixed [experts, capacity] batched matmuls at --capacity-factor, dropping what
  overflows (`dropped` says how much, for the router's random logits);
- `experts_only`: the same grouped matmuls on rows already sorted, with the same group sizes:
  what the experts' arithmetic costs without the dispatch (sorting, gathering the tokens' copies,
  putting the outputs back and weighing them). `dispatch_share` of the others is
  1 − experts_only / their time;
- `dense`: one gated MLP of k × expert_dim, a dense layer with the same active parameters per
  token.

Each is compiled, then timed as the median of --steps runs after a warm-up; `temp_bytes` is XLA's
compiled temporary memory. Figures are this device's (on CPU, XLA:CPU's).

    python bench/moe.py --tokens 4096 --d-model 512 --expert-dim 1024 --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlm.model import moe


def _timed(function, args, steps: int) -> tuple[float, int]:
    compiled = jax.jit(function).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--expert-dim", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    t, d, m, e, k = args.tokens, args.d_model, args.expert_dim, args.experts, args.top_k
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d), jnp.float32)
    weights = [
        jax.random.normal(key, shape, jnp.float32) * 0.05
        for key, shape in zip(keys[1:4], [(e, d, m), (e, d, m), (e, m, d)], strict=True)
    ]
    logits = jax.random.normal(keys[4], (t, e), jnp.float32)
    spec = moe.MoESpec(num_experts=e, top_k=k, expert_dim=m)
    routing = moe.route(logits, spec)
    capacity_spec = moe.MoESpec(num_experts=e, top_k=k, expert_dim=m, capacity_factor=args.capacity_factor)
    sizes = jnp.bincount(routing.experts.reshape(-1), length=e).astype(jnp.int32)

    def loss_of(compute):
        def loss(x, weights):
            return jnp.sum(compute(x, weights) ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1))

    def experts_only(rows, weights):  # rows: [t·k, d], already in expert order
        gate = jax.lax.ragged_dot(rows, weights[0], sizes)
        up = jax.lax.ragged_dot(rows, weights[1], sizes)
        return jax.lax.ragged_dot(jax.nn.silu(gate) * up, weights[2], sizes)

    dense_keys = jax.random.split(jax.random.key(1), 3)
    dense_weights = [
        jax.random.normal(key, shape, jnp.float32) * 0.05
        for key, shape in zip(dense_keys, [(d, k * m), (d, k * m), (k * m, d)], strict=True)
    ]

    def dense(x, w):
        return (jax.nn.silu(x @ w[0]) * (x @ w[1])) @ w[2]

    rows = jnp.repeat(x, k, axis=0)
    paths = {  # experts_only first: the others' dispatch share is measured against it
        "experts_only": (loss_of(experts_only), (rows, weights)),
        "ragged_dot": (loss_of(lambda x, w: moe.dropless(x, routing, *w, spec)), (x, weights)),
        "capacity": (loss_of(lambda x, w: moe.with_capacity(x, routing, *w, capacity_spec)[0]), (x, weights)),
        "dense": (loss_of(dense), (x, dense_weights)),
    }
    shape = {"tokens": t, "d_model": d, "expert_dim": m, "experts": e, "top_k": k}
    seconds = {}
    for name, (function, inputs) in paths.items():
        seconds[name], temp = _timed(function, inputs, args.steps)
        line = {
            "path": name,
            **shape,
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "fwd_bwd_s": seconds[name],
            "tokens_per_s": t / seconds[name],
            "temp_bytes": int(temp),
        }
        if name in ("ragged_dot", "capacity"):
            line["dispatch_share"] = max(0.0, 1 - seconds["experts_only"] / seconds[name])
        if name == "capacity":
            line["capacity_factor"] = args.capacity_factor
            line["dropped"] = float(moe.with_capacity(x, routing, *weights, capacity_spec)[1])
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
