"""The OLMoE family: the rotary decoder (`decoder.py`) with an RMSNorm over all heads' queries
and over all heads' keys (not per head, as Qwen3's), and every layer's MLP a mixture of experts
(`moe.py`): the top `experts_per_token` of `num_experts` SwiGLU experts by the router's softmax,
not renormalised unless `norm_top_k`. Its config keys, its Hugging Face conversion
(`OlmoeForCausalLM`) and its registry entry."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pydantic import Field

from jaxlm.errors import UserError
from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderSpec, LayerKind, MoEConfig
from jaxlm.model.registry import HFTensor, HuggingFace

OLMOE = "OlmoeForCausalLM"


class OlmoeConfig(MoEConfig):
    norm_top_k: bool = Field(
        False,
        description="Renormalise the chosen experts' router probabilities to sum to 1 (norm_topk_prob; OLMoE: false).",
    )


def spec(config: OlmoeConfig) -> DecoderSpec:
    kind = LayerKind(rope_theta=config.rope_theta)
    return DecoderSpec(
        kinds=(kind,),
        layer_kinds=(0,) * config.num_layers,
        qk_norm_all_heads=True,
        moe=decoder.moe_spec(config, norm_top_k=config.norm_top_k),
    )


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of an OlmoeForCausalLM → model keys of the olmoe family (intermediate_size is
    each expert's width)."""
    if hf.get("clip_qkv") is not None:
        raise UserError(
            f"config.json has clip_qkv={hf['clip_qkv']}; jaxlm's OLMoE does not clip queries, keys and values"
        )
    if hf.get("attention_bias"):
        raise UserError("config.json has attention_bias=true; jaxlm's OLMoE has no biases in attention")
    return {
        "family": "olmoe",
        **llama_hf.decoder_keys(hf),
        **llama_hf.default_rope_from_hf(hf),
        **llama_hf.moe_keys(hf, aux_loss_coef=0.01),
        "norm_top_k": bool(hf.get("norm_topk_prob", False)),
    }


def config_to_hf(config: OlmoeConfig, context_length: int) -> dict[str, Any]:
    return {
        "architectures": [OLMOE],
        "model_type": "olmoe",
        **llama_hf.decoder_config_to_hf(config, context_length),
        "num_experts": config.num_experts,
        **llama_hf.moe_config_to_hf(config),
        "norm_topk_prob": config.norm_top_k,
        "attention_bias": False,
        "clip_qkv": None,
    }


def tensors(config: OlmoeConfig) -> list[HFTensor]:
    """Qwen3-MoE's names, but q_norm.weight [heads × head_dim] and k_norm.weight [kv_heads ×
    head_dim]: one norm over all heads each."""
    h, k, hd = config.num_heads, config.num_kv_heads, config.head_dim
    whole = {"blocks.attention.q_norm.scale": (h, hd), "blocks.attention.k_norm.scale": (k, hd)}
    return [
        dataclasses.replace(
            tensor, hf_shape=(math.prod(whole[tensor.param]),), view=whole[tensor.param], order=(0, 1)
        )
        if tensor.param in whole
        else tensor
        for tensor in llama_hf.expert_tensors(
            config, "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm=True
        )
    ]


FAMILY = decoder.family(
    "olmoe",
    OlmoeConfig,
    spec,
    HuggingFace(
        architectures=(OLMOE,), config_from_hf=config_from_hf, config_to_hf=config_to_hf, tensors=tensors
    ),
    (*decoder.SHAPE_KEYS, "num_experts"),
    moe=True,
)
