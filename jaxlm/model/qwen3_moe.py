"""The Qwen3-MoE family: Qwen3's attention (q/k RMSNorm per head, an explicit head width) with
every layer's MLP a mixture of experts (`moe.py`): the top `experts_per_token` of `num_experts`
SwiGLU experts by the router's softmax, renormalised with `norm_top_k` (norm_topk_prob). Its
config keys, its Hugging Face conversion (`Qwen3MoeForCausalLM`) and its registry entry."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from jaxlm.errors import UserError
from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderSpec, LayerKind, MoEConfig
from jaxlm.model.registry import HFTensor, HuggingFace

QWEN3_MOE = "Qwen3MoeForCausalLM"


class Qwen3MoeConfig(MoEConfig):
    norm_top_k: bool = Field(
        True,
        description="Renormalise the chosen experts' router probabilities to sum to 1 (norm_topk_prob).",
    )


def spec(config: Qwen3MoeConfig) -> DecoderSpec:
    kind = LayerKind(rope_theta=config.rope_theta)
    return DecoderSpec(
        kinds=(kind,),
        layer_kinds=(0,) * config.num_layers,
        qk_norm=True,
        moe=decoder.moe_spec(config, norm_top_k=config.norm_top_k),
    )


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a Qwen3MoeForCausalLM → model keys of the qwen3_moe family. Every layer's
    MLP must be a mixture (decoder_sparse_step 1, no mlp_only_layers), as in the released models."""
    if hf.get("use_sliding_window"):
        raise UserError(
            "config.json has use_sliding_window=true; jaxlm reads Qwen3-MoE models with full attention only"
        )
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise UserError(
            f"config.json has decoder_sparse_step={hf.get('decoder_sparse_step')} and mlp_only_layers="
            f"{hf.get('mlp_only_layers')}; jaxlm reads Qwen3-MoE models whose every layer has experts "
            "(decoder_sparse_step 1, mlp_only_layers [])"
        )
    return {
        "family": "qwen3_moe",
        **llama_hf.decoder_keys(hf),
        **llama_hf.default_rope_from_hf(hf),
        "mlp_dim": llama_hf.required(hf, "moe_intermediate_size"),
        **llama_hf.moe_keys(hf, aux_loss_coef=0.001),
        "norm_top_k": bool(hf.get("norm_topk_prob", False)),
    }


def config_to_hf(config: Qwen3MoeConfig, context_length: int) -> dict[str, Any]:
    return {
        "architectures": [QWEN3_MOE],
        "model_type": "qwen3_moe",
        **llama_hf.decoder_config_to_hf(config, context_length),
        "moe_intermediate_size": config.mlp_dim,
        "num_experts": config.num_experts,
        "num_local_experts": config.num_experts,
        **llama_hf.moe_config_to_hf(config),
        "norm_topk_prob": config.norm_top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
    }


def tensors(config: Qwen3MoeConfig) -> list[HFTensor]:
    """Qwen3's attention tensors, and each layer's router mlp.gate.weight [experts, embed] and
    experts mlp.experts.{e}.gate_proj / up_proj [mlp, embed], down_proj [embed, mlp]."""
    return llama_hf.expert_tensors(config, "mlp", ("gate_proj", "up_proj", "down_proj"), qk_norm=True)


FAMILY = decoder.family(
    "qwen3_moe",
    Qwen3MoeConfig,
    spec,
    HuggingFace(
        architectures=(QWEN3_MOE,), config_from_hf=config_from_hf, config_to_hf=config_to_hf, tensors=tensors
    ),
    (*decoder.SHAPE_KEYS, "num_experts"),
    moe=True,
)
