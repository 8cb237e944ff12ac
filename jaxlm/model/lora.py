"""LoRA (low-rank adapters, Hu et al. 2021) inside a family's modules.

Beside a projection y = x·W the adapter adds dropout(x)·A·B·(alpha / rank): A [*in, rank] starts
random (as PEFT's default: uniform within ±1/sqrt(fan_in)), B [rank, *out] zero, so a fresh
adapter leaves the model as it was. A and B are `Adapter` variables: the train step
differentiates and updates only those, every other parameter stays frozen.

A module that owns projections keeps their adapters in an `Adapters` attribute named `lora`, so
projection `blocks.attention.wq` has its factors at `blocks.attention.lora.wq.a` and `.b`; the
family lists its projections in the registry (`ModelFamily.projections`) for everything that
reads or writes adapters outside the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.model.registry import Projection


class Adapter(nnx.Param):
    """A LoRA factor: the only kind of parameter a LoRA run trains."""


@dataclass(frozen=True)
class LoRASpec:
    """What the model needs of optim.lora."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # the family's projection names

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRA(nnx.Module):
    """The adapter of one projection weight whose first `inputs` axes meet x."""

    def __init__(self, weight: nnx.Param, inputs: int, spec: LoRASpec, rngs: nnx.Rngs):
        shape, axes = weight[...].shape, weight.get_metadata()["out_sharding"]
        in_shape, out_shape = shape[:inputs], shape[inputs:]
        bound = 1 / math.sqrt(math.prod(in_shape))
        dtype = weight[...].dtype
        a = jax.random.uniform(rngs.lora(), (*in_shape, spec.rank), dtype, -bound, bound)
        # The rank axis is small: replicated; the others are sharded like the weight's.
        self.a = Adapter(a, out_sharding=(*axes[:inputs], None), eager_sharding=False)
        self.b = Adapter(
            jnp.zeros((spec.rank, *out_shape), dtype),
            out_sharding=(None, *axes[inputs:]),
            eager_sharding=False,
        )
        self.inputs, self.scale, self.dropout = inputs, spec.scale, spec.dropout

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """x [batch, length, *in] → [batch, length, *out]."""
        dt = x.dtype
        if self.dropout and dropout_key is not None:
            keep = 1.0 - self.dropout
            x = jnp.where(jax.random.bernoulli(dropout_key, keep, x.shape), x / keep, 0).astype(dt)
        low = jnp.tensordot(x, self.a[...].astype(dt), axes=self.inputs)  # [batch, length, rank]
        return jnp.tensordot(low, self.b[...].astype(dt), axes=1) * jnp.asarray(self.scale, dt)


class Adapters(nnx.Module):
    """The adapters of a module's projections that optim.lora.targets names (none without LoRA).

    weights: the module's projections by name, each with how many of its leading axes meet x.
    """

    def __init__(self, weights: dict[str, tuple[nnx.Param, int]], spec: LoRASpec | None, rngs: nnx.Rngs):
        self.names = tuple(weights)  # every projection, adapted or not: fixes each one's dropout stream
        self.adapted = tuple(name for name in weights if spec and name in spec.targets)
        for name in self.adapted:
            weight, inputs = weights[name]
            setattr(self, name, LoRA(weight, inputs, spec, rngs))

    def __call__(self, name: str, x: jax.Array, y: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """y = x·W of projection `name`, plus its adapter's x·A·B·scale if it has one."""
        if name not in self.adapted:
            return y
        if dropout_key is not None:
            dropout_key = jax.random.fold_in(dropout_key, self.names.index(name))
        return y + getattr(self, name)(x, dropout_key)


def key_for(dropout_key: jax.Array | None, part: int) -> jax.Array | None:
    """The dropout key of one part (layer, sub-module) of a model; None stays None (no dropout)."""
    return None if dropout_key is None else jax.random.fold_in(dropout_key, part)


def adapter_path(projection: Projection) -> tuple[str, ...]:
    """Where the factors of `projection` sit among the parameters: <owner>.lora.<name>."""
    *owner, name = projection.param.split(".")
    return (*owner, "lora", name)


def lookup(params: Any, path: tuple[str, ...] | str) -> Any:
    for key in path.split(".") if isinstance(path, str) else path:
        params = params[key]
    return params


def merge(params: Any, projections: tuple[Projection, ...], spec: LoRASpec) -> Any:
    """The parameters (jax.Arrays, which it consumes) with every adapter folded into its weight,
    W + scale·A·B (computed in float32), and no adapters left: the base model's tree."""
    merged = _without_adapters(params)
    for projection in projections:
        if projection.name not in spec.targets:
            continue
        factors = lookup(params, adapter_path(projection))
        *owner, name = projection.param.split(".")
        parent = lookup(merged, tuple(owner))
        weight = parent[name]
        # One weight at a time, its buffer reused: merging never holds a second copy of the model.
        folded = jax.jit(fold, static_argnums=(3, 4), donate_argnums=0, out_shardings=weight.sharding)
        parent[name] = folded(weight, factors["a"], factors["b"], projection, spec.scale)
    return merged


def fold(weight: jax.Array, a: jax.Array, b: jax.Array, projection: Projection, scale: float) -> jax.Array:
    """weight [(layers,) *in, *out] + scale · a [(layers,) *in, rank] · b [(layers,) rank, *out]."""
    lead = weight.shape[:1] if projection.stacked else ()
    rank = a.shape[-1]
    a = a.astype(jnp.float32).reshape(*lead, -1, rank)  # [(layers,) in, rank]
    b = b.astype(jnp.float32).reshape(*lead, rank, -1)  # [(layers,) rank, out]
    delta = jnp.matmul(a, b).reshape(weight.shape)
    return (weight.astype(jnp.float32) + scale * delta).astype(weight.dtype)


def _without_adapters(params: Any) -> Any:
    """A copy of the nested dicts of `params` without their `lora` entries."""
    if not isinstance(params, dict):
        return params
    return {key: _without_adapters(value) for key, value in params.items() if key != "lora"}


def split_adapters(params: Any) -> tuple[Any, Any]:
    """(the adapters, the rest): two nested dicts that `combine` puts back together."""
    return _only_adapters(params) or {}, _without_adapters(params)


def _only_adapters(params: Any) -> Any:
    if not isinstance(params, dict):
        return None
    found = {key: value if key == "lora" else _only_adapters(value) for key, value in params.items()}
    return {key: value for key, value in found.items() if value} or None


def combine(first: Any, second: Any) -> Any:
    """Two nested dicts with no leaf in common, as one."""
    merged = dict(first)
    for key, value in second.items():
        merged[key] = combine(merged[key], value) if key in merged else value
    return merged
