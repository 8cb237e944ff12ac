"""The Llama family's Hugging Face counterpart: transformers' LlamaForCausalLM (Llama 2, 3, 3.1,
3.2) and Qwen2ForCausalLM (the same blocks with biases on q, k and v). Their config.json in and
out, and where each jaxlm parameter is among their tensors. The rotary decoder's keys and tensors,
which Mistral and Qwen3 name the same way, are read and written here for them too."""

from __future__ import annotations

from typing import Any

from jaxlm.errors import UserError
from jaxlm.model.registry import HFTensor, HuggingFace

LLAMA, QWEN2 = "LlamaForCausalLM", "Qwen2ForCausalLM"
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def required(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise UserError(f"config.json has no {key}, which a {hf['architectures'][0]} needs; is it complete?")
    return hf[key]


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM or Qwen2ForCausalLM → model keys of the llama family."""
    architecture = hf["architectures"][0]
    if architecture == QWEN2 and hf.get("use_sliding_window"):
        raise UserError(
            "config.json has use_sliding_window=true; jaxlm reads Qwen2 models with full attention only"
        )
    for key in ("attention_bias", "mlp_bias"):
        if architecture == LLAMA and hf.get(key):
            raise UserError(f"config.json has {key}=true; jaxlm's Llama has no biases there")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json has hidden_act={hf['hidden_act']}; jaxlm's Llama MLP is SwiGLU (silu)")
    return {
        "family": "llama",
        **decoder_keys(hf),
        "qkv_bias": architecture == QWEN2,
        **rope_from_hf(hf),
    }


def decoder_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """The rotary decoder's keys (`decoder.DecoderConfig`) of a config.json."""
    heads, d_model = required(hf, "num_attention_heads"), required(hf, "hidden_size")
    return {
        "vocab_size": required(hf, "vocab_size"),
        "d_model": d_model,
        "num_layers": required(hf, "num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or d_model // heads,
        "mlp_dim": required(hf, "intermediate_size"),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "context_length": hf.get("max_position_embeddings"),
    }


def default_rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta of a family that reads RoPE without scaling; one line for scaling."""
    rope = rope_from_hf(hf)
    if rope["rope_scaling"] is not None:
        raise UserError(
            f"config.json's {hf['architectures'][0]} scales RoPE ({rope['rope_scaling']['type']}), which "
            "jaxlm reads for Llama models only; it reads default RoPE here"
        )
    return {"rope_theta": rope["rope_theta"]}


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling, from `rope_parameters` (transformers 5) or from `rope_theta`
    and `rope_scaling` (earlier releases)."""
    parameters = hf.get("rope_parameters")
    if parameters:
        theta, scaling = parameters.get("rope_theta", hf.get("rope_theta", 10000.0)), parameters
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind != "llama3":
        raise UserError(
            f"config.json has RoPE scaling type {kind!r}, which jaxlm does not implement; it reads default and llama3"
        )
    missing = [key for key in LLAMA3_SCALING_KEYS if key not in scaling]
    if missing:
        raise UserError(f"config.json's llama3 RoPE scaling has no {', '.join(missing)}; is it complete?")
    return {
        "rope_theta": theta,
        "rope_scaling": {"type": "llama3", **{k: scaling[k] for k in LLAMA3_SCALING_KEYS}},
    }


def config_to_hf(config, context_length: int) -> dict[str, Any]:
    """The config.json transformers reads as this model: Qwen2ForCausalLM with q/k/v biases,
    LlamaForCausalLM without. RoPE is written both ways: `rope_parameters` (transformers 5) and
    `rope_theta` + `rope_scaling` (earlier releases). context_length: the source's, where
    model.context_length is null."""
    scaling = config.rope_scaling
    llama3 = {key: getattr(scaling, key) for key in LLAMA3_SCALING_KEYS} if scaling else {}
    hf = {
        "architectures": [QWEN2 if config.qkv_bias else LLAMA],
        "model_type": "qwen2" if config.qkv_bias else "llama",
        **decoder_config_to_hf(config, context_length),
        "rope_scaling": {"rope_type": "llama3", **llama3} if scaling else None,
        "rope_parameters": {
            "rope_type": "llama3" if scaling else "default",
            "rope_theta": config.rope_theta,
            **llama3,
        },
    }
    if config.qkv_bias:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


def decoder_config_to_hf(config, context_length: int) -> dict[str, Any]:
    """The rotary decoder's keys in config.json, RoPE without scaling written both ways."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length or context_length,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "attention_dropout": 0.0,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }


def tensors(config) -> list[HFTensor]:
    """Llama's and Qwen2's tensors: the decoder's, with q/k/v biases where the model has them."""
    return decoder_tensors(config, qkv_bias=config.qkv_bias)


def decoder_tensors(config, qkv_bias: bool = False, qk_norm: bool = False) -> list[HFTensor]:
    """Every parameter's tensor. jaxlm keeps heads on their own axes and stacks the blocks:
    wq [embed, heads, head_dim] is q_proj.weight [heads × head_dim, embed] of each layer."""
    d, h, k, hd, m, v = (
        config.d_model,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
        config.vocab_size,
    )
    layer = "model.layers.{layer}"

    def block(param: str, name: str, hf_shape, view, order) -> HFTensor:
        return HFTensor(f"blocks.{param}", f"{layer}.{name}", hf_shape, view, order, stacked=True)

    def matrix(param: str, name: str, rows: int, columns: int) -> HFTensor:  # a transposed Linear
        return block(param, name, (rows, columns), (rows, columns), (1, 0))

    def norm(param: str, name: str) -> HFTensor:
        return block(param, name, (d,), (d,), (0,))

    found = [
        HFTensor("embedding", "model.embed_tokens.weight", (v, d), (v, d), (0, 1), stacked=False),
        HFTensor("final_norm.scale", "model.norm.weight", (d,), (d,), (0,), stacked=False),
        norm("attention_norm.scale", "input_layernorm.weight"),
        block("attention.wq", "self_attn.q_proj.weight", (h * hd, d), (h, hd, d), (2, 0, 1)),
        block("attention.wk", "self_attn.k_proj.weight", (k * hd, d), (k, hd, d), (2, 0, 1)),
        block("attention.wv", "self_attn.v_proj.weight", (k * hd, d), (k, hd, d), (2, 0, 1)),
        block("attention.wo", "self_attn.o_proj.weight", (d, h * hd), (d, h, hd), (1, 2, 0)),
        norm("mlp_norm.scale", "post_attention_layernorm.weight"),
        matrix("mlp.w_gate", "mlp.gate_proj.weight", m, d),
        matrix("mlp.w_up", "mlp.up_proj.weight", m, d),
        matrix("mlp.w_down", "mlp.down_proj.weight", d, m),
    ]
    if qk_norm:
        found += [
            block("attention.q_norm.scale", "self_attn.q_norm.weight", (hd,), (hd,), (0,)),
            block("attention.k_norm.scale", "self_attn.k_norm.weight", (hd,), (hd,), (0,)),
        ]
    if qkv_bias:
        found += [
            block("attention.bq", "self_attn.q_proj.bias", (h * hd,), (h, hd), (0, 1)),
            block("attention.bk", "self_attn.k_proj.bias", (k * hd,), (k, hd), (0, 1)),
            block("attention.bv", "self_attn.v_proj.bias", (k * hd,), (k, hd), (0, 1)),
        ]
    if not config.tie_embeddings:
        found.append(HFTensor("lm_head", "lm_head.weight", (v, d), (v, d), (1, 0), stacked=False))
    return found


HUGGING_FACE = HuggingFace(
    architectures=(LLAMA, QWEN2),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tensors=tensors,
)


def expert_tensors(config, module: str, names: tuple[str, str, str], qk_norm: bool = False) -> list[HFTensor]:
    """`decoder_tensors` with each layer's MLP a mixture of experts: the router
    `model.layers.{layer}.<module>.gate.weight` [experts, embed] and, per expert,
    `<module>.experts.{expert}.<name>.weight` for the (gate, up, down) `names`: [mlp, embed],
    [mlp, embed], [embed, mlp], as transformers saves them."""
    d, m, e = config.d_model, config.mlp_dim, config.num_experts
    prefix = f"model.layers.{{layer}}.{module}"

    def expert(param: str, name: str, rows: int, columns: int) -> HFTensor:
        shape = (rows, columns)
        return HFTensor(
            f"blocks.mlp.{param}", f"{prefix}.experts.{{expert}}.{name}.weight", shape, shape, (1, 0), True, e
        )

    gate, up, down = names
    return [
        *(
            tensor
            for tensor in decoder_tensors(config, qk_norm=qk_norm)
            if not tensor.param.startswith("blocks.mlp.")
        ),
        HFTensor("blocks.mlp.router", f"{prefix}.gate.weight", (e, d), (e, d), (1, 0), stacked=True),
        expert("w_gate", gate, m, d),
        expert("w_up", up, m, d),
        expert("w_down", down, d, m),
    ]


def moe_keys(hf: dict[str, Any], aux_loss_coef: float) -> dict[str, Any]:
    """A mixture-of-experts config.json's keys of `decoder.MoEConfig`: the experts
    (num_local_experts, or num_experts as older files name it), the router's top k and the
    load-balancing weight (router_aux_loss_coef; `aux_loss_coef` where it is absent)."""
    return {
        "num_experts": hf.get("num_local_experts") or required(hf, "num_experts"),
        "experts_per_token": required(hf, "num_experts_per_tok"),
        "load_balance_weight": hf.get("router_aux_loss_coef", aux_loss_coef),
    }


def moe_config_to_hf(config) -> dict[str, Any]:
    """The keys every mixture-of-experts config.json has, from `decoder.MoEConfig`."""
    return {
        "num_experts_per_tok": config.experts_per_token,
        "router_aux_loss_coef": config.load_balance_weight,
        "output_router_logits": False,
    }
