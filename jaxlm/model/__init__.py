"""The language model (Flax NNX)."""

from jaxlm.model.transformer import Transformer

__all__ = ["Transformer"]
