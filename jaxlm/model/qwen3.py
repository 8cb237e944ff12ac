"""The Qwen3 family (dense): the rotary decoder (`decoder.py`) of Llama with an RMSNorm over each
head's queries and keys before rotary positions, and an explicit head width. Its config keys, its
Hugging Face conversion (`Qwen3ForCausalLM`) and its registry entry."""

from __future__ import annotations

from typing import Any

from jaxlm.errors import UserError
from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderConfig, DecoderSpec, LayerKind
from jaxlm.model.registry import HuggingFace

QWEN3 = "Qwen3ForCausalLM"


class Qwen3Config(DecoderConfig):
    pass


def spec(config: Qwen3Config) -> DecoderSpec:
    kind = LayerKind(rope_theta=config.rope_theta)
    return DecoderSpec(kinds=(kind,), layer_kinds=(0,) * config.num_layers, qk_norm=True)


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a Qwen3ForCausalLM → model keys of the qwen3 family."""
    if hf.get("use_sliding_window"):
        raise UserError(
            "config.json has use_sliding_window=true; jaxlm reads Qwen3 models with full attention only"
        )
    if hf.get("attention_bias"):
        raise UserError("config.json has attention_bias=true; jaxlm's Qwen3 has no biases in attention")
    return {"family": "qwen3", **llama_hf.decoder_keys(hf), **llama_hf.default_rope_from_hf(hf)}


def config_to_hf(config: Qwen3Config, context_length: int) -> dict[str, Any]:
    return {
        "architectures": [QWEN3],
        "model_type": "qwen3",
        **llama_hf.decoder_config_to_hf(config, context_length),
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_layers,
        "layer_types": ["full_attention"] * config.num_layers,
    }


def tensors(config: Qwen3Config):
    return llama_hf.decoder_tensors(config, qk_norm=True)


FAMILY = decoder.family(
    "qwen3",
    Qwen3Config,
    spec,
    HuggingFace(
        architectures=(QWEN3,), config_from_hf=config_from_hf, config_to_hf=config_to_hf, tensors=tensors
    ),
)
