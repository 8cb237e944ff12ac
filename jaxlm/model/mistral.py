"""The Mistral family: the rotary decoder (`decoder.py`) of Llama, every layer attending over a
sliding window of the tokens before it (in training, in the KV cache and under context
parallelism; XLA's attention and splash). Its config keys, its Hugging Face conversion
(`MistralForCausalLM`) and its registry entry."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderConfig, DecoderSpec, LayerKind
from jaxlm.model.registry import HuggingFace

MISTRAL = "MistralForCausalLM"


class MistralConfig(DecoderConfig):
    sliding_window: int | None = Field(
        4096,
        gt=0,
        description="Tokens each query attends to, itself included (Mistral 7B: 4096); null = the whole row.",
    )


def spec(config: MistralConfig) -> DecoderSpec:
    kind = LayerKind(window=config.sliding_window, rope_theta=config.rope_theta)
    return DecoderSpec(kinds=(kind,), layer_kinds=(0,) * config.num_layers)


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a MistralForCausalLM → model keys of the mistral family."""
    return {
        "family": "mistral",
        **llama_hf.decoder_keys(hf),
        **llama_hf.default_rope_from_hf(hf),
        "sliding_window": hf.get("sliding_window"),
    }


def config_to_hf(config: MistralConfig, context_length: int) -> dict[str, Any]:
    return {
        "architectures": [MISTRAL],
        "model_type": "mistral",
        **llama_hf.decoder_config_to_hf(config, context_length),
        "sliding_window": config.sliding_window,
    }


FAMILY = decoder.family(
    "mistral",
    MistralConfig,
    spec,
    HuggingFace(
        architectures=(MISTRAL,),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        tensors=llama_hf.decoder_tensors,
    ),
)
