"""jaxlm's train step against a minimal hand-written JAX train step of the same shapes, on one device.

- reference: the Llama-style model written out plainly below (embedding, RMSNorm, rotary
  positions, grouped-query attention with a causal mask, SwiGLU, tied or untied head), its
  parameters a plain dict with one dict per layer applied in a Python loop, and Optax's AdamW
  after global-norm clipping, with the config's shapes, dtypes and hyperparameters.
- jaxlm: `jaxlm.training.setup.jit_train_step`, the step `jaxlm train` runs, built on the same device.

Both run on the same device-resident batch of random tokens (one document per row, so the
causal mask is all the masking either needs), after --warmup untimed calls (the first compiles).
Each is timed in windows of train.log_every steps that block only at their end, like the bare
step of bench/train_throughput.py, and the windows of the two alternate, so that load from
other processes falls on both alike. Step time is the median window.

ratio = jaxlm tokens/s ÷ reference tokens/s: at least 1.0 means the framework's step costs
nothing over hand-written JAX. With --layer-modes, jaxlm's step is timed both ways, with its
scan over layers (model.scan_layers=true, the default) and unrolled (false, as the CPU configs
set it), in the same alternation: scan_ratio and unrolled_ratio are their tokens/s ÷ the
reference's, and ratio is the one the config asks for. Prints one JSON line to stdout; logs go
to stderr.

    python bench/reference_step.py configs/tiny.yaml --steps 200 --layer-modes
    python bench/reference_step.py configs/small_20m.yaml --steps 30 --layer-modes
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Sibling scripts: `python bench/<script>.py` puts bench/ on sys.path.
from report import report
from train_throughput import random_batch

from jaxlm.config import Config, load_config
from jaxlm.data import pipeline
from jaxlm.model.llama import LlamaConfig
from jaxlm.training.setup import build_train, count_params, jit_train_step

log = logging.getLogger("jaxlm")

Params = dict[str, Any]  # embedding, layers (a list of dicts), final_norm, lm_head (if untied)


def init_params(model: LlamaConfig, key: jax.Array) -> Params:
    """Normal(init_std) matrices and unit norm scales, in model.param_dtype."""
    d, heads, kv_heads, head_dim = model.d_model, model.num_heads, model.num_kv_heads, model.head_dim
    param_dtype = jnp.dtype(model.param_dtype)
    keys = iter(jax.random.split(key, 7 * model.num_layers + 2))

    def normal(*shape: int) -> jax.Array:
        return model.init_std * jax.random.normal(next(keys), shape, param_dtype)

    def layer() -> Params:
        return {
            "attention_norm": jnp.ones((d,), param_dtype),
            "wq": normal(d, heads, head_dim),
            "wk": normal(d, kv_heads, head_dim),
            "wv": normal(d, kv_heads, head_dim),
            "wo": normal(heads, head_dim, d),
            "mlp_norm": jnp.ones((d,), param_dtype),
            "w_gate": normal(d, model.mlp_dim),
            "w_up": normal(d, model.mlp_dim),
            "w_down": normal(model.mlp_dim, d),
        }

    params = {
        "embedding": normal(model.vocab_size, d),
        "layers": [layer() for _ in range(model.num_layers)],
        "final_norm": jnp.ones((d,), param_dtype),
    }
    if not model.tie_embeddings:
        params["lm_head"] = normal(d, model.vocab_size)
    return params


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x: [batch, length, heads, head_dim]; sin, cos: [length, 1, head_dim / 2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(x: jax.Array, layer: Params, sin: jax.Array, cos: jax.Array, model: LlamaConfig) -> jax.Array:
    batch, length, _ = x.shape
    groups = model.num_heads // model.num_kv_heads
    dtype = x.dtype
    q = rotate(jnp.einsum("bte,ehd->bthd", x, layer["wq"].astype(dtype)), sin, cos)
    k = rotate(jnp.einsum("bte,ekd->btkd", x, layer["wk"].astype(dtype)), sin, cos)
    v = jnp.einsum("bte,ekd->btkd", x, layer["wv"].astype(dtype))  # [batch, length, kv_heads, head_dim]
    q = q.reshape(batch, length, model.num_kv_heads, groups, model.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    scores = jnp.where(causal, scores / math.sqrt(model.head_dim), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [batch, kv_heads, groups, length, length]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, model.num_heads, model.head_dim)
    return jnp.einsum("bthd,hde->bte", out, layer["wo"].astype(dtype))


def mlp(x: jax.Array, layer: Params) -> jax.Array:
    dtype = x.dtype
    gate = x @ layer["w_gate"].astype(dtype)
    up = x @ layer["w_up"].astype(dtype)
    return (jax.nn.silu(gate) * up) @ layer["w_down"].astype(dtype)


def loss_fn(params: Params, tokens: jax.Array, targets: jax.Array, model: LlamaConfig) -> jax.Array:
    """Mean next-token cross-entropy; tokens, targets: [batch, length] int32."""
    dtype = jnp.dtype(model.dtype)
    length = tokens.shape[1]
    half = model.head_dim // 2
    inverse_frequency = 1.0 / model.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None, None] * inverse_frequency  # [length, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)

    x = params["embedding"][tokens].astype(dtype)  # [batch, length, embed]
    for layer in params["layers"]:
        x = x + attention(rms_norm(x, layer["attention_norm"], model.norm_eps), layer, sin, cos, model)
        x = x + mlp(rms_norm(x, layer["mlp_norm"], model.norm_eps), layer)
    x = rms_norm(x, params["final_norm"], model.norm_eps)
    head = params["embedding"].T if model.tie_embeddings else params["lm_head"]
    logits = (x @ head.astype(dtype)).astype(jnp.float32)  # [batch, length, vocab]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logits)


def make_reference_step(config: Config) -> tuple[Callable, Callable]:
    """The jitted step, (params, opt_state), batch → ((params, opt_state), loss) with the state
    donated, and the jitted key → (params, opt_state) that makes its first state."""
    optim = config.optim
    optimizer = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
    )

    def train_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch["tokens"], batch["targets"], config.model)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def init(key: jax.Array):
        params = init_params(config.model, key)
        return params, optimizer.init(params)

    return jax.jit(train_step, donate_argnums=0), jax.jit(init)


def time_alternating(steps: dict[str, tuple[Callable, Any, Any]], config: Config, warmup: int) -> dict:
    """Median seconds per step of each (step, state, batch), timed in alternating windows."""
    states = {name: state for name, (_, state, _) in steps.items()}
    for name, (train_step, _, batch) in steps.items():
        for _ in range(warmup):  # the first call compiles
            states[name], metrics = train_step(states[name], batch)
        jax.block_until_ready(metrics)
    per_step: dict[str, list[float]] = {name: [] for name in steps}
    for first in range(0, config.train.steps, config.train.log_every):
        window = min(config.train.log_every, config.train.steps - first)
        for name, (train_step, _, batch) in steps.items():
            started = time.perf_counter()
            for _ in range(window):
                states[name], metrics = train_step(states[name], batch)
            jax.block_until_ready(metrics)
            per_step[name].append((time.perf_counter() - started) / window)
    return {name: statistics.median(seconds) for name, seconds in per_step.items()}


def benchmark(
    config_path: str, overrides: list[str], steps: int, warmup: int, layer_modes: bool
) -> dict[str, Any]:
    """Time the reference and jaxlm's step on one device; the figures of the JSON line."""
    config = load_config(config_path, [*overrides, f"train.steps={steps}"])
    device = jax.devices()[0]
    host_batch = random_batch(config)
    reference_step, reference_init = make_reference_step(config)
    reference_state = reference_init(jax.random.key(config.train.seed))
    reference_batch = {field: jax.device_put(host_batch[field], device) for field in ("tokens", "targets")}
    steps_to_time = {"reference": (reference_step, reference_state, reference_batch)}

    configured = "jaxlm_scan" if config.model.scan_layers else "jaxlm_unrolled"
    variants = {configured: config}
    if layer_modes:
        for name, scan_layers in (("jaxlm_scan", True), ("jaxlm_unrolled", False)):
            variants[name] = load_config(
                config_path, [*overrides, f"train.steps={steps}", f"model.scan_layers={scan_layers}"]
            )
    for name, variant in sorted(variants.items()):
        setup = build_train(variant, devices=[device])
        params = count_params(setup.abstract_state.params)
        state = setup.init(jax.random.key(variant.train.seed))
        steps_to_time[name] = (
            jit_train_step(variant, setup),
            state,
            pipeline.to_global(host_batch, setup.batch_sharding),
        )
    reference_params = sum(leaf.size for leaf in jax.tree.leaves(reference_state[0]))
    if reference_params != params:
        raise RuntimeError(f"the reference has {reference_params} parameters, jaxlm {params}: shapes differ")

    step_time_s = time_alternating(steps_to_time, config, warmup)
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    figures = {
        "config": config_path,
        "overrides": overrides,
        "device": {"platform": device.platform, "kind": device.device_kind},
        "jax": jax.__version__,
        "steps": steps,
        "global_batch_size": config.train.global_batch_size,
        "seq_len": config.data.seq_len,
        "params": params,
        "scan_layers": config.model.scan_layers,
        "reference_tokens_per_s": tokens_per_step / step_time_s["reference"],
        "reference_step_time_s": step_time_s["reference"],
        "jaxlm_tokens_per_s": tokens_per_step / step_time_s[configured],
        "jaxlm_step_time_s": step_time_s[configured],
        "ratio": step_time_s["reference"] / step_time_s[configured],
    }
    if layer_modes:
        for name in ("jaxlm_scan", "jaxlm_unrolled"):
            figures[f"{name}_tokens_per_s"] = tokens_per_step / step_time_s[name]
            figures[f"{name.removeprefix('jaxlm_')}_ratio"] = step_time_s["reference"] / step_time_s[name]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--steps", type=int, default=50, help="timed steps of each step function")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps; the first compiles")
    parser.add_argument(
        "--layer-modes", action="store_true", help="time jaxlm's step with its layers scanned and unrolled"
    )
    args = parser.parse_intermixed_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1: the first call compiles")
    return report(lambda: benchmark(args.config, args.overrides, args.steps, args.warmup, args.layer_modes))


if __name__ == "__main__":
    sys.exit(main())
