"""The Gemma 3 family (text): the rotary decoder (`decoder.py`) with embeddings scaled by
√d_model, RMSNorms that scale by 1 + w, norms before and after attention and the MLP, q/k norms,
GeGLU, queries scaled by `query_pre_attn_scalar`, and a pattern of local layers (a sliding window,
their own RoPE base) between global ones (a linear RoPE stretch); soft-capped scores and logits
where a config sets them (Gemma 2 style). Its config keys, its Hugging Face conversion
(`Gemma3ForCausalLM`) and its registry entry."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pydantic import Field, model_validator

from jaxlm.errors import UserError
from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderConfig, DecoderSpec, LayerKind
from jaxlm.model.layers import LinearRopeScaling
from jaxlm.model.registry import HFTensor, HuggingFace

log = logging.getLogger("jaxlm")

GEMMA3 = "Gemma3ForCausalLM"
SLIDING, FULL = "sliding_attention", "full_attention"


class Gemma3Config(DecoderConfig):
    rope_theta: float = Field(
        1_000_000.0, gt=0, description="Base of the rotary frequencies of global layers."
    )
    rope_local_theta: float = Field(
        10_000.0, gt=0, description="Base of the rotary frequencies of local layers."
    )
    rope_scaling_factor: float | None = Field(
        None,
        gt=0,
        description="Linear stretch of the global layers' rotary positions (Gemma 3 4B-27B: 8); null = none.",
    )
    sliding_window: int | None = Field(
        1024,
        gt=0,
        description="Tokens a local layer's query attends to, itself included; null = every layer global.",
    )
    sliding_window_pattern: int = Field(
        6,
        gt=0,
        description="Every this-many-th layer is global, the others local (Gemma 3: 6, five local then one global).",
    )
    query_pre_attn_scalar: int | None = Field(
        None, gt=0, description="Attention scores are scaled by its inverse square root; null = head_dim."
    )
    attn_logit_softcapping: float | None = Field(
        None, gt=0, description="Attention scores → cap · tanh(scores / cap) (Gemma 2); null = uncapped."
    )
    final_logit_softcapping: float | None = Field(
        None, gt=0, description="Logits → cap · tanh(logits / cap) (Gemma 2); null = uncapped."
    )
    norm_eps: float = Field(1e-6, gt=0, description="Epsilon of RMSNorm.")

    @model_validator(mode="after")
    def _pattern(self) -> Gemma3Config:
        if self.sliding_window is not None and self.sliding_window_pattern == 1:
            raise ValueError(
                "model.sliding_window_pattern=1 makes every layer global, so model.sliding_window is unused; "
                "set model.sliding_window=null, or a pattern above 1"
            )
        return self


def layer_types(config: Gemma3Config) -> list[str]:
    """Each layer's kind, as transformers' config.json lists them."""
    pattern = config.sliding_window_pattern
    if config.sliding_window is None:
        return [FULL] * config.num_layers
    return [FULL if (layer + 1) % pattern == 0 else SLIDING for layer in range(config.num_layers)]


def spec(config: Gemma3Config) -> DecoderSpec:
    scaling = LinearRopeScaling(config.rope_scaling_factor) if config.rope_scaling_factor else None
    kinds = {
        SLIDING: LayerKind(window=config.sliding_window, rope_theta=config.rope_local_theta),
        FULL: LayerKind(rope_theta=config.rope_theta, rope_scaling=scaling),
    }
    types = layer_types(config)
    used = sorted(set(types), key=types.index)
    return DecoderSpec(
        kinds=tuple(kinds[kind] for kind in used),
        layer_kinds=tuple(used.index(kind) for kind in types),
        qk_norm=True,
        norm_plus_one=True,
        post_norms=True,
        activation="gelu_tanh",
        embed_scale=True,
        query_scale=(config.query_pre_attn_scalar or config.head_dim) ** -0.5,
        attn_softcap=config.attn_logit_softcapping,
        final_softcap=config.final_logit_softcapping,
    )


def _rope(parameters: dict[str, Any], layer: str) -> tuple[float | None, float | None]:
    """(theta, linear factor) of one layer kind's RoPE; one line for another scaling."""
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in ("default", "linear"):
        raise UserError(
            f"config.json's {layer} layers scale RoPE by {kind!r}; jaxlm reads default and linear"
        )
    return parameters.get("rope_theta"), parameters.get("factor") if kind == "linear" else None


def _pattern(types: list[str]) -> tuple[int, bool]:
    """(sliding_window_pattern, whether any layer is local) of config.json's layer_types."""
    if SLIDING not in types:
        return 1, False
    pattern = types.index(FULL) + 1 if FULL in types else len(types) + 1
    expected = [FULL if (layer + 1) % pattern == 0 else SLIDING for layer in range(len(types))]
    if types != expected:
        raise UserError(
            "config.json's layer_types are not every n-th layer global, which is the pattern jaxlm's Gemma 3 "
            "computes (model.sliding_window_pattern)"
        )
    return pattern, True


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a Gemma3ForCausalLM (transformers 5's per-layer-type rope_parameters, or the
    older rope_theta, rope_local_base_freq and rope_scaling) → model keys of the gemma3 family."""
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(
            f"config.json has hidden_activation={activation}; jaxlm's Gemma 3 MLP is GeGLU (tanh)"
        )
    num_layers = llama_hf.required(hf, "num_hidden_layers")
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    types = hf.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
    pattern, local = _pattern(types)
    rope = hf.get("rope_parameters") or {}
    if FULL in rope or SLIDING in rope:
        theta, factor = _rope(rope.get(FULL, {}), "global")
        local_theta, _ = _rope(rope.get(SLIDING, {}), "local")
    else:
        theta, factor = _rope(
            {"rope_theta": hf.get("rope_theta"), **(hf.get("rope_scaling") or {})}, "global"
        )
        local_theta = hf.get("rope_local_base_freq")
    if hf.get("attn_logit_softcapping") is not None:
        # transformers' Gemma3 attention never applies it (5.24, 5.25): what it computes is uncapped.
        log.warning(
            "config.json sets attn_logit_softcapping=%s, which transformers' Gemma3ForCausalLM does not "
            "apply; the imported model does not either (model.attn_logit_softcapping=null)",
            hf["attn_logit_softcapping"],
        )
    return {
        "family": "gemma3",
        **llama_hf.decoder_keys(hf),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "rope_theta": theta or 1_000_000.0,
        "rope_local_theta": local_theta or 10_000.0,
        "rope_scaling_factor": factor,
        "sliding_window": hf.get("sliding_window") if local else None,
        "sliding_window_pattern": pattern,
        "query_pre_attn_scalar": hf.get("query_pre_attn_scalar"),
        "final_logit_softcapping": hf.get("final_logit_softcapping"),
    }


def config_to_hf(config: Gemma3Config, context_length: int) -> dict[str, Any]:
    if config.attn_logit_softcapping is not None:
        raise UserError(
            f"model.attn_logit_softcapping={config.attn_logit_softcapping}: transformers' Gemma3ForCausalLM "
            "does not apply it, so it would compute another model; export a model trained without it"
        )
    full = {"rope_type": "linear", "factor": config.rope_scaling_factor} if config.rope_scaling_factor else {}
    full = {"rope_type": "default", **full, "rope_theta": config.rope_theta}
    hf = llama_hf.decoder_config_to_hf(config, context_length)
    hf.pop("hidden_act")
    return {
        "architectures": [GEMMA3],
        "model_type": "gemma3_text",
        **hf,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            FULL: full,
            SLIDING: {"rope_type": "default", "rope_theta": config.rope_local_theta},
        },
        "rope_theta": config.rope_theta,
        "rope_local_base_freq": config.rope_local_theta,
        "rope_scaling": {"rope_type": "linear", "factor": config.rope_scaling_factor}
        if config.rope_scaling_factor
        else None,
        "sliding_window": config.sliding_window,
        "layer_types": layer_types(config),
        "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": config.final_logit_softcapping,
    }


# Gemma's own names for the norms: post_attention_layernorm is the norm of attention's output,
# pre_feedforward_layernorm the MLP's input norm (Llama's post_attention_layernorm).
NORM_NAMES = {
    "blocks.mlp_norm.scale": "pre_feedforward_layernorm.weight",
    "blocks.attention_post_norm.scale": "post_attention_layernorm.weight",
    "blocks.mlp_post_norm.scale": "post_feedforward_layernorm.weight",
}


def tensors(config: Gemma3Config) -> list[HFTensor]:
    found = llama_hf.decoder_tensors(config, qk_norm=True)
    norm = next(tensor for tensor in found if tensor.param == "blocks.mlp_norm.scale")
    found += [dataclasses.replace(norm, param=param) for param in NORM_NAMES if param != norm.param]
    layer = "model.layers.{layer}."
    return [
        dataclasses.replace(tensor, name=layer + NORM_NAMES[tensor.param])
        if tensor.param in NORM_NAMES
        else tensor
        for tensor in found
    ]


FAMILY = decoder.family(
    "gemma3",
    Gemma3Config,
    spec,
    HuggingFace(
        architectures=(GEMMA3,), config_from_hf=config_from_hf, config_to_hf=config_to_hf, tensors=tensors
    ),
)
