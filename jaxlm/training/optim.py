"""The Optax optimizer from config: AdamW with a decay mask, global-norm clipping, LR schedules."""

from __future__ import annotations

import jax
import optax

from jaxlm.config import Config, OptimConfig
from jaxlm.model import registry


def learning_rate_schedule(config: OptimConfig, schedule_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay, warmup-stable-decay (WSD), or constant."""
    peak, warmup = config.lr, config.warmup_steps
    end = peak * config.min_lr_ratio
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(schedule_steps, warmup + 1), end)
    warmup_schedule = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if config.schedule == "constant":
        return optax.join_schedules([warmup_schedule, optax.constant_schedule(peak)], [warmup])
    decay_steps = max(1, round(schedule_steps * config.decay_fraction))
    stable_steps = max(0, schedule_steps - warmup - decay_steps)
    return optax.join_schedules(
        [
            warmup_schedule,
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, end, decay_steps),
        ],
        [warmup, warmup + stable_steps],
    )


def weight_decay_mask(params, family: registry.ModelFamily, decay_embeddings: bool):
    """True for the parameters AdamW decays, as the model family says."""

    def decays(path, _) -> bool:
        return family.decays(".".join(str(getattr(key, "key", key)) for key in path), decay_embeddings)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    optim = config.optim
    schedule = learning_rate_schedule(optim, config.schedule_steps)
    family = registry.family_of(config.model)
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda params: weight_decay_mask(params, family, optim.decay_embeddings),
    )
    clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule
