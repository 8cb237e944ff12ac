"""The DeepSeek-V3 family: multi-head latent attention (`mla.py`), the first
`first_k_dense_replace` layers with a dense SwiGLU MLP, the rest mixtures of experts with
DeepSeek's sigmoid router (a per-expert balancing bias in the choice, the top `top_groups` of
`expert_groups` groups eligible, weights renormalised and scaled by `routed_scaling_factor`) and
shared experts; YaRN-stretched rotary positions. Its config keys, its Hugging Face conversion
(`DeepseekV3ForCausalLM`) and its registry entry."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from jaxlm.errors import UserError
from jaxlm.model import decoder, llama_hf
from jaxlm.model.decoder import DecoderSpec, LayerKind, MoEConfig
from jaxlm.model.layers import YarnRopeScaling, yarn_mscale
from jaxlm.model.mla import MLASpec
from jaxlm.model.registry import AttentionNeeds, HFTensor, HuggingFace, LayerTraffic

DEEPSEEK_V3 = "DeepseekV3ForCausalLM"


class DeepseekV3Config(MoEConfig):
    q_lora_rank: int | None = Field(
        None, gt=0, description="Queries' low-rank bottleneck (q_lora_rank); null: one projection."
    )
    kv_lora_rank: int = Field(512, gt=0, description="Width of the latent that keys and values come from.")
    qk_nope_head_dim: int = Field(
        128, gt=0, description="Each head's query and key channels without positions."
    )
    qk_rope_head_dim: int = Field(
        64, gt=0, description="Each head's query and key channels with rotary positions (even)."
    )
    v_head_dim: int = Field(128, gt=0, description="Each head's value width.")
    first_k_dense_replace: int = Field(
        0, ge=0, description="The first layers whose MLP is dense (width dense_mlp_dim), not a mixture."
    )
    dense_mlp_dim: int = Field(
        0, ge=0, description="MLP width of the dense first layers (intermediate_size)."
    )
    shared_experts: int = Field(
        1, ge=0, description="Shared experts every token goes through (n_shared_experts)."
    )
    expert_groups: int = Field(1, gt=0, description="Groups of experts the router picks among (n_group).")
    top_groups: int = Field(1, gt=0, description="Groups whose experts a token may choose (topk_group).")
    routed_scaling_factor: float = Field(1.0, gt=0, description="Factor of the routed experts' weights.")
    norm_top_k: bool = Field(True, description="Renormalise the chosen experts' scores (norm_topk_prob).")
    bias_update_rate: float = Field(
        0.001,
        ge=0,
        description="Auxiliary-loss-free balancing: after every step each expert's router bias moves this much up if the step gave it less than an even share, down if more (DeepSeek-V3's γ); 0: the bias stays as loaded.",
    )
    yarn_factor: float | None = Field(
        None,
        gt=0,
        description="YaRN's stretch of the rotary positions (rope_parameters.factor); null: plain RoPE.",
    )
    yarn_original_context: int | None = Field(
        None,
        gt=0,
        description="YaRN: the context the model was trained at first (original_max_position_embeddings).",
    )
    yarn_beta_fast: float = Field(32.0, gt=0, description="YaRN: frequencies turning more often are kept.")
    yarn_beta_slow: float = Field(
        1.0, gt=0, description="YaRN: frequencies turning less often are stretched."
    )
    yarn_mscale_all_dim: float = Field(
        0.0, ge=0, description="YaRN: the scores' scale grows by mscale(factor, this)² (0: not at all)."
    )

    @model_validator(mode="after")
    def _deepseek(self) -> DeepseekV3Config:
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary positions"
            )
        if self.first_k_dense_replace >= self.num_layers:
            raise ValueError(
                f"model.first_k_dense_replace={self.first_k_dense_replace} leaves none of the "
                f"{self.num_layers} layers a mixture of experts; use fewer than {self.num_layers}"
            )
        if self.first_k_dense_replace and not self.dense_mlp_dim:
            raise ValueError(
                "model.first_k_dense_replace > 0 needs model.dense_mlp_dim, the dense layers' MLP width"
            )
        if self.num_experts % self.expert_groups or self.top_groups > self.expert_groups:
            raise ValueError(
                f"model.expert_groups={self.expert_groups} must divide model.num_experts={self.num_experts} "
                f"and be at least model.top_groups={self.top_groups}"
            )
        if (self.yarn_factor is None) != (self.yarn_original_context is None):
            raise ValueError("set model.yarn_factor and model.yarn_original_context together (or neither)")
        return self


def mla_spec(config: DeepseekV3Config) -> MLASpec:
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    mscale = yarn_mscale(config.yarn_factor, config.yarn_mscale_all_dim) if config.yarn_factor else 1.0
    return MLASpec(
        heads=config.num_heads,
        kv_rank=config.kv_lora_rank,
        nope_dim=config.qk_nope_head_dim,
        rope_dim=config.qk_rope_head_dim,
        v_dim=config.v_head_dim,
        q_rank=config.q_lora_rank,
        scale=qk**-0.5 * mscale**2,
        norm_eps=config.norm_eps,
    )


def spec(config: DeepseekV3Config) -> DecoderSpec:
    scaling = None
    if config.yarn_factor:
        scaling = YarnRopeScaling(
            config.yarn_factor,
            config.yarn_original_context,
            config.rope_theta,
            config.yarn_beta_fast,
            config.yarn_beta_slow,
        )
    router = {
        "router": "sigmoid",
        "norm_top_k": config.norm_top_k,
        "groups": config.expert_groups,
        "top_groups": config.top_groups,
        "routed_scale": config.routed_scaling_factor,
        "shared_dim": config.shared_experts * config.mlp_dim,
    }
    return DecoderSpec(
        kinds=(LayerKind(rope_theta=config.rope_theta, rope_scaling=scaling),),
        layer_kinds=(0,) * config.num_layers,
        moe=decoder.moe_spec(config, **router),
        dense_layers=config.first_k_dense_replace,
        dense_mlp_dim=config.dense_mlp_dim,
        mla=mla_spec(config),
    )


def matmul_params(config: DeepseekV3Config) -> int:
    """Active parameters in a matmul per token: latent attention's projections, the dense layers'
    MLP, and of the mixtures the router, the k chosen experts and the shared ones."""
    d, h, m = config.d_model, config.num_heads, config.mlp_dim
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    q = d * h * qk if config.q_lora_rank is None else config.q_lora_rank * (d + h * qk)
    kv = d * (config.kv_lora_rank + config.qk_rope_head_dim)
    kv += config.kv_lora_rank * h * (config.qk_nope_head_dim + config.v_head_dim)
    attention = q + kv + h * config.v_head_dim * d
    dense = config.first_k_dense_replace
    moe = d * config.num_experts + 3 * d * m * (config.experts_per_token + config.shared_experts)
    mlps = dense * 3 * d * config.dense_mlp_dim + (config.num_layers - dense) * moe
    return config.num_layers * attention + mlps + d * config.vocab_size


def flops_per_token(config: DeepseekV3Config, seq_len: int, frozen_weights: bool = False) -> float:
    """6 per active matmul parameter (4 with frozen weights), and attention's scores (qk wide)
    and weighted values (v_head_dim wide) over the whole row, forward and backward."""
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    attention = 6 * config.num_layers * config.num_heads * (qk + config.v_head_dim) * seq_len
    return (4 if frozen_weights else 6) * matmul_params(config) + attention


def traffic(config: DeepseekV3Config) -> LayerTraffic:
    moe_layers = config.num_layers - config.first_k_dense_replace
    experts = moe_layers * config.num_experts * 3 * config.d_model * config.mlp_dim
    return LayerTraffic(
        tensor_reductions=2,
        context_gathered=None,  # latent attention is not laid out for context parallelism (yet)
        routed_copies=config.experts_per_token * moe_layers / config.num_layers,
        expert_params=experts,
    )


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json of a DeepseekV3ForCausalLM → model keys of the deepseek_v3 family."""
    quantized = hf.get("quantization_config")
    if quantized:
        raise UserError(
            f"config.json has quantization_config ({quantized.get('quant_method', '?')} "
            f"{quantized.get('fmt', '')}): the weights are quantized (DeepSeek-V3's release is fp8 with "
            "block scales); jaxlm reads bfloat16 or float32 weights: convert them first (DeepSeek's "
            "fp8_cast_bf16.py)"
        )
    if hf.get("rope_interleave") is False:
        raise UserError(
            "config.json has rope_interleave=false; jaxlm reads DeepSeek-V3's interleaved rotary channels only"
        )
    if hf.get("attention_bias"):
        raise UserError(
            "config.json has attention_bias=true; jaxlm reads DeepSeek-V3 without attention biases"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    yarn: dict[str, Any] = {}
    if kind == "yarn":
        if rope.get("mscale", 1.0) != rope.get("mscale_all_dim", 0.0) and rope.get("mscale_all_dim"):
            raise UserError(
                f"config.json's YaRN has mscale={rope.get('mscale')} ≠ mscale_all_dim={rope.get('mscale_all_dim')} "
                "(rotary tables scaled); jaxlm reads them equal, as DeepSeek-V3's"
            )
        yarn = {
            "yarn_factor": float(rope["factor"]),
            "yarn_original_context": int(rope["original_max_position_embeddings"]),
            "yarn_beta_fast": float(rope.get("beta_fast") or 32),
            "yarn_beta_slow": float(rope.get("beta_slow") or 1),
            "yarn_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
        }
    elif kind != "default":
        raise UserError(
            f"config.json has RoPE scaling type {kind!r}; jaxlm reads DeepSeek-V3 with yarn or none"
        )
    keys = llama_hf.decoder_keys(hf)
    return {
        "family": "deepseek_v3",
        **{key: value for key, value in keys.items() if key not in ("head_dim", "mlp_dim")},
        "num_kv_heads": keys["num_heads"],
        "rope_theta": theta,
        **yarn,
        "mlp_dim": llama_hf.required(hf, "moe_intermediate_size"),
        "dense_mlp_dim": llama_hf.required(hf, "intermediate_size"),
        "num_experts": hf.get("n_routed_experts") or llama_hf.required(hf, "num_local_experts"),
        "experts_per_token": llama_hf.required(hf, "num_experts_per_tok"),
        "load_balance_weight": 0.0,  # balanced by the router's bias, not an auxiliary loss
        "q_lora_rank": hf.get("q_lora_rank"),
        "kv_lora_rank": llama_hf.required(hf, "kv_lora_rank"),
        "qk_nope_head_dim": llama_hf.required(hf, "qk_nope_head_dim"),
        "qk_rope_head_dim": llama_hf.required(hf, "qk_rope_head_dim"),
        "v_head_dim": llama_hf.required(hf, "v_head_dim"),
        "first_k_dense_replace": hf.get("first_k_dense_replace") or 0,
        "shared_experts": hf.get("n_shared_experts") or 0,
        "expert_groups": hf.get("n_group") or 1,
        "top_groups": hf.get("topk_group") or 1,
        "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
        "norm_top_k": bool(hf.get("norm_topk_prob", True)),
    }


def config_to_hf(config: DeepseekV3Config, context_length: int) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.yarn_factor:
        rope = {
            "rope_type": "yarn",
            "rope_theta": config.rope_theta,
            "factor": config.yarn_factor,
            "original_max_position_embeddings": config.yarn_original_context,
            "beta_fast": config.yarn_beta_fast,
            "beta_slow": config.yarn_beta_slow,
            "mscale": config.yarn_mscale_all_dim or 1.0,
            "mscale_all_dim": config.yarn_mscale_all_dim,
        }
    written = llama_hf.decoder_config_to_hf(config, context_length)
    for key in ("rope_theta", "rope_scaling"):
        written.pop(key)
    written["head_dim"] = config.qk_rope_head_dim  # as transformers sets it: the rotary width
    return {
        "architectures": [DEEPSEEK_V3],
        "model_type": "deepseek_v3",
        **written,
        "intermediate_size": config.dense_mlp_dim or config.mlp_dim,
        "moe_intermediate_size": config.mlp_dim,
        "n_routed_experts": config.num_experts,
        "n_shared_experts": config.shared_experts,
        "num_experts_per_tok": config.experts_per_token,
        "routed_scaling_factor": config.routed_scaling_factor,
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "v_head_dim": config.v_head_dim,
        "n_group": config.expert_groups,
        "topk_group": config.top_groups,
        "first_k_dense_replace": config.first_k_dense_replace,
        "norm_topk_prob": config.norm_top_k,
        "rope_parameters": rope,
        "rope_interleave": True,
        "attention_bias": False,
    }


def tensors(config: DeepseekV3Config) -> list[HFTensor]:
    """The embedding, final norm and head, and each stack's (`stack_tensors`): the dense first
    layers' (`dense_blocks`) and the mixtures' (`blocks`)."""
    d, v, dense = config.d_model, config.vocab_size, config.first_k_dense_replace
    found = [
        HFTensor("embedding", "model.embed_tokens.weight", (v, d), (v, d), (0, 1), stacked=False),
        HFTensor("final_norm.scale", "model.norm.weight", (d,), (d,), (0,), stacked=False),
    ]
    if not config.tie_embeddings:
        found.append(HFTensor("lm_head", "lm_head.weight", (v, d), (v, d), (1, 0), stacked=False))
    if not dense:
        return found + stack_tensors(config, "blocks", None)
    mixtures = (dense, config.num_layers - dense)
    return (
        found + stack_tensors(config, "dense_blocks", (0, dense)) + stack_tensors(config, "blocks", mixtures)
    )


def stack_tensors(config: DeepseekV3Config, stack: str, layers: tuple[int, int] | None) -> list[HFTensor]:
    """One stack's tensors (`layers`: its first layer in the checkpoint and how many): the norms
    and latent attention's projections; the dense MLP's mlp.{gate,up,down}_proj, or the router
    mlp.gate.weight [experts, embed] with its e_score_correction_bias, the experts
    mlp.experts.{e}.* and the shared experts mlp.shared_experts.*."""
    d, h, e, m = config.d_model, config.num_heads, config.num_experts, config.mlp_dim
    qk, nope, vd = (
        config.qk_nope_head_dim + config.qk_rope_head_dim,
        config.qk_nope_head_dim,
        config.v_head_dim,
    )
    r, rope = config.kv_lora_rank, config.qk_rope_head_dim

    def block(param, name, hf_shape, view, order, experts=0) -> HFTensor:
        return HFTensor(
            f"{stack}.{param}", f"model.layers.{{layer}}.{name}", hf_shape, view, order, True, experts, layers
        )

    def norm(param, name, size) -> HFTensor:
        return block(param, name, (size,), (size,), (0,))

    def matrix(param, name, rows, columns, experts=0) -> HFTensor:  # a transposed Linear
        return block(param, name, (rows, columns), (rows, columns), (1, 0), experts)

    def heads_out(param, name, width, inputs) -> HFTensor:  # [heads × width, inputs] → [inputs, heads, width]
        return block(param, name, (h * width, inputs), (h, width, inputs), (2, 0, 1))

    found = [
        norm("attention_norm.scale", "input_layernorm.weight", d),
        norm("mlp_norm.scale", "post_attention_layernorm.weight", d),
        matrix("attention.wkv_a", "self_attn.kv_a_proj_with_mqa.weight", r + rope, d),
        norm("attention.kv_norm.scale", "self_attn.kv_a_layernorm.weight", r),
        heads_out("attention.wkv_b", "self_attn.kv_b_proj.weight", nope + vd, r),
        block("attention.wo", "self_attn.o_proj.weight", (d, h * vd), (d, h, vd), (1, 2, 0)),
    ]
    if config.q_lora_rank is None:
        found.append(heads_out("attention.wq", "self_attn.q_proj.weight", qk, d))
    else:
        q = config.q_lora_rank
        found += [
            matrix("attention.wq_a", "self_attn.q_a_proj.weight", q, d),
            norm("attention.q_norm.scale", "self_attn.q_a_layernorm.weight", q),
            heads_out("attention.wq_b", "self_attn.q_b_proj.weight", qk, q),
        ]
    if stack == "dense_blocks":
        md = config.dense_mlp_dim
        return [
            *found,
            matrix("mlp.w_gate", "mlp.gate_proj.weight", md, d),
            matrix("mlp.w_up", "mlp.up_proj.weight", md, d),
            matrix("mlp.w_down", "mlp.down_proj.weight", d, md),
        ]
    found += [
        matrix("mlp.router", "mlp.gate.weight", e, d),
        norm("mlp.router_bias", "mlp.gate.e_score_correction_bias", e),
        matrix("mlp.w_gate", "mlp.experts.{expert}.gate_proj.weight", m, d, e),
        matrix("mlp.w_up", "mlp.experts.{expert}.up_proj.weight", m, d, e),
        matrix("mlp.w_down", "mlp.experts.{expert}.down_proj.weight", d, m, e),
    ]
    if config.shared_experts:
        s = config.shared_experts * m
        found += [
            matrix("mlp.shared_gate", "mlp.shared_experts.gate_proj.weight", s, d),
            matrix("mlp.shared_up", "mlp.shared_experts.up_proj.weight", s, d),
            matrix("mlp.shared_down", "mlp.shared_experts.down_proj.weight", d, s),
        ]
    return found


# Latent attention's own logical axes: the bottlenecks' widths split as the residual stream's
# (`embed`) do, so that wq_b and wkv_b, which have no embed axis, are not whole on every device.
MLA_RULES = {"q_rank": ("fsdp", "context", "expert"), "kv_rank": ("fsdp", "context", "expert")}

FAMILY = decoder.family(
    "deepseek_v3",
    DeepseekV3Config,
    spec,
    HuggingFace(
        architectures=(DEEPSEEK_V3,),
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        tensors=tensors,
    ),
    (
        *("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "num_experts", "tie_embeddings"),
        *("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
        *("first_k_dense_replace", "dense_mlp_dim", "shared_experts"),
    ),
    moe=True,
    flops=flops_per_token,
    layer_traffic=traffic,
    attention=lambda config: AttentionNeeds(latent=True),
    rules=MLA_RULES,
    projections=(),
)
