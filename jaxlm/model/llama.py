"""The Llama family: the rotary decoder (`decoder.py`) with RMSNorm, SwiGLU, Llama 3.1's RoPE
scaling, and optional biases on q, k and v (Qwen2). Its config keys and its registry entry; its
Hugging Face conversion is `llama_hf`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jaxlm.config import Section
from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderConfig, DecoderSpec, LayerKind
from jaxlm.model.layers import Llama3RopeScaling


class RopeScaling(Section):
    """model.rope_scaling: Llama 3.1's stretch of the rotary frequencies to a longer context."""

    type: Literal["llama3"] = Field("llama3", description="The scaling rule; llama3 is the one jaxlm has.")
    factor: float = Field(gt=0, description="How much longer wavelengths are stretched (8 in Llama 3.1).")
    low_freq_factor: float = Field(gt=0, description="Wavelengths above original/this are stretched fully.")
    high_freq_factor: float = Field(gt=0, description="Wavelengths below original/this are kept.")
    original_max_position_embeddings: int = Field(
        gt=0, description="The context length the frequencies were trained for."
    )

    @model_validator(mode="after")
    def _ordered(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}"
            )
        return self

    def layer(self) -> Llama3RopeScaling:
        return Llama3RopeScaling(
            self.factor, self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings
        )


class LlamaConfig(DecoderConfig):
    rope_scaling: RopeScaling | None = Field(
        None,
        description="null, or Llama 3.1's stretch of the rotary frequencies: {type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}.",
    )
    qkv_bias: bool = Field(
        False, description="Biases on the query, key and value projections (as Qwen2 has); never decayed."
    )


def spec(config: LlamaConfig) -> DecoderSpec:
    scaling = config.rope_scaling.layer() if config.rope_scaling else None
    kind = LayerKind(rope_theta=config.rope_theta, rope_scaling=scaling)
    return DecoderSpec(kinds=(kind,), layer_kinds=(0,) * config.num_layers, qkv_bias=config.qkv_bias)


FAMILY = decoder.family("llama", LlamaConfig, spec, llama_hf.HUGGING_FACE, (*decoder.SHAPE_KEYS, "qkv_bias"))
