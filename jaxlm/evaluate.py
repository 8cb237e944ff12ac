"""Evaluation during training: loss and bits per byte on fixed validation batches."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxlm.config import Config
from jaxlm.data import pipeline
from jaxlm.data.tokenizers import Tokenizer
from jaxlm.setup import ModelSetup, abstract_batch, compile_ahead, jit_eval_step, with_shardings


class Evaluator:
    """Evaluates every train.eval_every steps and at the last step (never with eval_every 0),
    on the same validation batches each time, placed on the devices once."""

    def __init__(self, config: Config, setup: ModelSetup, corpus: pipeline.Corpus, tokenizer: Tokenizer):
        self.every, self.last_step = config.train.eval_every, config.train.steps
        if not self.every:
            return
        self._batches = [
            pipeline.to_global(batch, setup.batch_sharding)
            for batch in pipeline.eval_host_batches(corpus, config, tokenizer)
        ]
        # Compiled now, so an eval step that cannot compile fails before the first train step.
        self._step = compile_ahead(
            "eval",
            jit_eval_step(config, setup, tokenizer.token_bytes()),
            with_shardings(setup.abstract_params, setup.param_shardings),
            abstract_batch(config, setup.batch_sharding),
        )

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last_step)

    def evaluate(self, params: Any) -> dict[str, float]:
        # Dispatch every batch, then fetch the per-batch sums once: one host sync per eval.
        sums = jax.device_get([self._step(params, batch) for batch in self._batches])
        loss_sum, tokens, byte_count = np.sum(np.asarray(sums, np.float64), axis=0)
        return {
            "eval_loss": loss_sum / tokens,
            "eval_bits_per_byte": loss_sum / math.log(2) / max(byte_count, 1),
        }
