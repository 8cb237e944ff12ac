"""The Mixtral family: the rotary decoder (`decoder.py`) of Mistral whose MLPs are mixtures of
experts (`moe.py`): each token goes through the top `experts_per_token` of `num_experts` SwiGLU
experts, weighted by the renormalised softmax of its router. Its config keys, its Hugging Face
conversion (`MixtralForCausalLM`) and its registry entry."""

from __future__ import annotations

from typing import Any, Literal

import jax
from pydantic import Field, model_validator

from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderConfig, DecoderSpec, LayerKind
from jaxlm.model.moe import MoESpec
from jaxlm.model.registry import HFTensor, HuggingFace

MIXTRAL = "MixtralForCausalLM"


class MixtralConfig(DecoderConfig):
    num_experts: int = Field(8, gt=0, description="Routed experts in each layer (num_local_experts).")
    experts_per_token: int = Field(
        2, gt=0, description="Experts each token goes through (num_experts_per_tok): the router's top k."
    )
    capacity_factor: float | None = Field(
        None,
        gt=0,
        description="Null: dropless (every token reaches its experts). A number: each expert takes at most capacity_factor × tokens × experts_per_token / num_experts tokens per step and drops the rest.",
    )
    moe_kernel: Literal["auto", "ragged_dot", "megablox"] = Field(
        "auto",
        description="Grouped matmuls of the dropless experts: ragged_dot (jax.lax.ragged_dot, any device), megablox (the Pallas TPU kernel), auto (megablox on TPU, else ragged_dot).",
    )
    load_balance_weight: float = Field(
        0.01,
        ge=0,
        description="Weight of the load-balancing auxiliary loss (router_aux_loss_coef), averaged over layers.",
    )
    router_z_weight: float = Field(
        0.0, ge=0, description="Weight of the router z-loss (ST-MoE), averaged over layers."
    )
    sliding_window: int | None = Field(
        None, gt=0, description="Tokens each query attends to, itself included; null = the whole row."
    )

    @model_validator(mode="after")
    def _experts(self) -> MixtralConfig:
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"model.experts_per_token={self.experts_per_token} is more than model.num_experts="
                f"{self.num_experts}; choose at most {self.num_experts}"
            )
        return self


def spec(config: MixtralConfig) -> DecoderSpec:
    kernel = config.moe_kernel
    if kernel == "auto":
        kernel = "megablox" if jax.devices()[0].platform == "tpu" else "ragged_dot"
    moe = MoESpec(
        num_experts=config.num_experts,
        top_k=config.experts_per_token,
        expert_dim=config.mlp_dim,
        capacity_factor=config.capacity_factor,
        kernel=kernel,
    )
    kind = LayerKind(window=config.sliding_window, rope_theta=config.rope_theta)
    return DecoderSpec(
        kinds=(kind,),
        layer_kinds=(0,) * config.num_layers,
        moe=moe,
        moe_loss_weights=(config.load_balance_weight, config.router_z_weight),
    )


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a MixtralForCausalLM → model keys of the mixtral family."""
    return {
        "family": "mixtral",
        **llama_hf.decoder_keys(hf),
        **llama_hf.default_rope_from_hf(hf),
        "sliding_window": hf.get("sliding_window"),
        "num_experts": hf.get("num_local_experts", 8),
        "experts_per_token": hf.get("num_experts_per_tok", 2),
        "load_balance_weight": hf.get("router_aux_loss_coef", 0.001),
    }


def config_to_hf(config: MixtralConfig, context_length: int) -> dict[str, Any]:
    return {
        "architectures": [MIXTRAL],
        "model_type": "mixtral",
        **llama_hf.decoder_config_to_hf(config, context_length),
        "sliding_window": config.sliding_window,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.experts_per_token,
        "router_aux_loss_coef": config.load_balance_weight,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
    }


def tensors(config: MixtralConfig) -> list[HFTensor]:
    """The decoder's tensors but the MLP's, and each layer's router and experts as
    `save_pretrained` writes them: block_sparse_moe.gate.weight [experts, embed], and per expert
    w1 (gate) and w3 (up) [mlp, embed], w2 (down) [embed, mlp]."""
    d, m, e = config.d_model, config.mlp_dim, config.num_experts
    moe = "model.layers.{layer}.block_sparse_moe"

    def expert(param: str, name: str, rows: int, columns: int) -> HFTensor:
        return HFTensor(
            f"blocks.mlp.{param}",
            f"{moe}.experts.{{expert}}.{name}",
            (rows, columns),
            (rows, columns),
            (1, 0),
            True,
            e,
        )

    return [
        *(
            tensor
            for tensor in llama_hf.decoder_tensors(config)
            if not tensor.param.startswith("blocks.mlp.")
        ),
        HFTensor("blocks.mlp.router", f"{moe}.gate.weight", (e, d), (e, d), (1, 0), stacked=True),
        expert("w_gate", "w1.weight", m, d),
        expert("w_up", "w3.weight", m, d),
        expert("w_down", "w2.weight", d, m),
    ]


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
