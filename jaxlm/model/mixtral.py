"""The Mixtral family: the rotary decoder (`decoder.py`) of Mistral whose MLPs are mixtures of
experts (`moe.py`): each token goes through the top `experts_per_token` of `num_experts` SwiGLU
experts, weighted by the renormalised softmax of its router. Its config keys, its Hugging Face
conversion (`MixtralForCausalLM`) and its registry entry."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderSpec, LayerKind, MoEConfig
from jaxlm.model.registry import HFTensor, HuggingFace

MIXTRAL = "MixtralForCausalLM"


class MixtralConfig(MoEConfig):
    sliding_window: int | None = Field(
        None, gt=0, description="Tokens each query attends to, itself included; null = the whole row."
    )


def spec(config: MixtralConfig) -> DecoderSpec:
    kind = LayerKind(window=config.sliding_window, rope_theta=config.rope_theta)
    return DecoderSpec(
        kinds=(kind,),
        layer_kinds=(0,) * config.num_layers,
        moe=decoder.moe_spec(config),
    )


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a MixtralForCausalLM → model keys of the mixtral family."""
    return {
        "family": "mixtral",
        **llama_hf.decoder_keys(hf),
        **llama_hf.default_rope_from_hf(hf),
        "sliding_window": hf.get("sliding_window"),
        **llama_hf.moe_keys(hf, aux_loss_coef=0.001),
    }


def config_to_hf(config: MixtralConfig, context_length: int) -> dict[str, Any]:
    return {
        "architectures": [MIXTRAL],
        "model_type": "mixtral",
        **llama_hf.decoder_config_to_hf(config, context_length),
        "sliding_window": config.sliding_window,
        "num_local_experts": config.num_experts,
        **llama_hf.moe_config_to_hf(config),
        "router_jitter_noise": 0.0,
    }


def tensors(config: MixtralConfig) -> list[HFTensor]:
    """The decoder's tensors but the MLP's, and each layer's router and experts as
    `save_pretrained` writes them: block_sparse_moe.gate.weight [experts, embed], and per expert
    w1 (gate) and w3 (up) [mlp, embed], w2 (down) [embed, mlp]."""
    return llama_hf.expert_tensors(config, "block_sparse_moe", ("w1", "w3", "w2"))


FAMILY = decoder.family(
    "mixtral",
    MixtralConfig,
    spec,
    HuggingFace(
        architectures=(MIXTRAL,), config_from_hf=config_from_hf, config_to_hf=config_to_hf, tensors=tensors
    ),
    (*decoder.SHAPE_KEYS, "num_experts"),
    moe=True,
)
