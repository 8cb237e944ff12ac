"""The rotary decoder's families beyond Llama, each against transformers (the fixtures of
tests/fixtures/hf, made by make_fixtures.py): Mistral (a sliding window of 32 tokens, in training
and in the KV cache), Qwen3 (q/k norms, head_dim 32 ≠ hidden / heads) and Gemma 3 (three local
layers with a window of 32 and their own RoPE base, then a global one with linearly stretched
RoPE; (1 + w) norms before and after attention and the MLP, GeGLU, query_pre_attn_scalar 24;
gemma3_softcap: final logits capped at 3). Their logits on a
600-token prompt on one device and on a tensor × FSDP mesh, greedy generation past the window,
import → export → import bitwise; training on a mesh split gives one device's losses; what a
kernel or config cannot do is one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, read_metrics, tiny_config, train_losses
from flax import nnx
from safetensors import safe_open

import jaxlm
from jaxlm.errors import ConfigError, UserError
from jaxlm.hf.peft import read_adapter
from jaxlm.inference.export import export, export_adapter
from jaxlm.inference.generation import complete
from jaxlm.inference.loading import apply_init_from, open_source, source_config
from jaxlm.model import deepseek_v3, moe, qwen3_moe, registry
from jaxlm.model.lora import split_adapters
from jaxlm.training.setup import _unmet_needs, build_model
from jaxlm.training.train import train

FIXTURES = REPO / "tests/fixtures/hf"
FAMILIES = ["mistral", "qwen3", "gemma3", "gemma3_softcap", "mixtral", "qwen3_moe", "olmoe", "deepseek_v3"]


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"{name}.reference.npz"))


@jax.jit
def _forward(graphdef, params, tokens):  # tokens: [1, length]
    positions = jnp.arange(tokens.shape[1])[None]
    return nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens)).logits[0]


def logit_error(loaded, name: str) -> float:
    """Largest difference from transformers' logits on the 600-token prompt, relative to the
    largest logit."""
    expected = reference(name)
    tokens = jnp.asarray(expected["prompt_ids"])[None]
    logits = np.asarray(_forward(loaded.setup.graphdef, loaded.params, tokens))[expected["logit_positions"]]
    return float(np.abs(logits - expected["logits"]).max() / np.abs(expected["logits"]).max())


@pytest.fixture(scope="module", params=FAMILIES)
def one_device(request):
    return request.param, jaxlm.load(FIXTURES / request.param, devices=jax.devices()[:1])


def test_imported_models_give_transformers_logits_and_read_their_family(one_device):
    name, loaded = one_device
    assert loaded.config.model.family == name.removesuffix("_softcap")
    assert logit_error(loaded, name) <= 1e-4
    expected = reference(name)
    assert loaded.eos_ids == tuple(expected["eos_ids"])
    bos = [] if loaded.bos_id is None else [loaded.bos_id]
    assert [*bos, *loaded.tokenizer.encode(str(expected["prompt_text"]))][:600] == expected[
        "prompt_ids"
    ].tolist()


def test_greedy_generation_is_transformers_token_for_token_past_the_window(one_device):
    name, loaded = one_device
    expected = reference(name)
    [completion] = complete(loaded, [expected["greedy_prompt_ids"].tolist()], max_new_tokens=32, greedy=True)
    eos = np.isin(expected["greedy_ids"], expected["eos_ids"])
    stop = int(eos.argmax()) if eos.any() else len(expected["greedy_ids"])
    assert completion.token_ids == expected["greedy_ids"][:stop].tolist()
    # Prompts of three lengths in one batch, left-padded to one length: each as it was alone.
    prompts = [expected[f"batch_prompt_{i}"].tolist() for i in range(3)]
    for i, completion in enumerate(complete(loaded, prompts, max_new_tokens=16, greedy=True)):
        row = expected[f"batch_greedy_{i}"]
        eos = np.isin(row, expected["eos_ids"])
        stop = int(eos.argmax()) if eos.any() else len(row)
        assert completion.token_ids == row[:stop].tolist(), i


def test_the_sliding_window_is_what_makes_mistral_agree():
    wide = jaxlm.load(
        FIXTURES / "mistral", devices=jax.devices()[:1], overrides=["model.sliding_window=null"]
    )
    assert logit_error(wide, "mistral") > 0.1


# gemma3_softcap runs gemma3's code; its logits, capped at 3, make float32's rounding on a mesh
# (1.2e-4 of the largest, 4e-5 of the uncapped one) look larger than gemma3's (2e-5).
@pytest.mark.parametrize("name", ["mistral", "qwen3", "gemma3"])
def test_transformers_logits_on_a_tensor_and_fsdp_mesh(name):
    loaded = jaxlm.load(FIXTURES / name, overrides=["mesh.tensor=2", "mesh.fsdp=4"])
    assert len(loaded.params["blocks"]["attention"]["wq"].sharding.device_set) == 8
    assert logit_error(loaded, name) <= 1e-4


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_transformers_logits_on_an_expert_and_fsdp_mesh(name):
    """Each device reads and holds a quarter of the experts (hf/read reads a block's experts
    only), and the tokens go to them by all-to-all."""
    loaded = jaxlm.load(FIXTURES / name, overrides=["mesh.expert=4", "mesh.fsdp=2"])
    w_gate = loaded.params["blocks"]["mlp"]["w_gate"]
    layers, experts, embed, width = w_gate.shape
    assert {shard.data.shape for shard in w_gate.addressable_shards} == {
        (layers, experts // 4, embed // 2, width)
    }
    assert logit_error(loaded, name) <= 1e-4
    if name != "mixtral":  # one family decodes on the mesh (a compile of its own)
        return
    # Decoding one row on the mesh: every device routes the same token, the experts' devices
    # compute it, the all-to-all brings it back.
    expected = reference(name)
    [completion] = complete(loaded, [expected["greedy_prompt_ids"].tolist()], max_new_tokens=8, greedy=True)
    eos = np.isin(expected["greedy_ids"][:8], expected["eos_ids"])
    stop = int(eos.argmax()) if eos.any() else 8
    assert completion.token_ids == expected["greedy_ids"][:stop].tolist()


def read_tensors(directory) -> dict[str, np.ndarray]:
    files = sorted(directory.glob("*.safetensors"))
    tensors = {}
    for file in files:
        with safe_open(file, framework="numpy") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safe_open is no dict)
    return tensors


@pytest.mark.parametrize("name", FAMILIES)
def test_import_export_import_gives_back_the_same_tensors_bitwise(name, tmp_path):
    export(FIXTURES / name, tmp_path / "out", devices=jax.devices()[:2])
    original, exported = read_tensors(FIXTURES / name), read_tensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    for tensor, value in original.items():
        assert exported[tensor].dtype == value.dtype and np.array_equal(exported[tensor], value), tensor
    written, given = (
        json.loads((d / "config.json").read_text()) for d in (tmp_path / "out", FIXTURES / name)
    )
    keys = ("architectures", "head_dim", "num_key_value_heads", "tie_word_embeddings", "sliding_window")
    keys += ("layer_types", "query_pre_attn_scalar", "rope_parameters", "final_logit_softcapping")
    keys += ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
    if given.get("head_dim") is None:  # Mixtral's null: hidden_size / heads, written out
        assert written.pop("head_dim") == given["hidden_size"] // given["num_attention_heads"]
    for key in keys:  # transformers' config classes check types too: 24.0 is no query_pre_attn_scalar
        assert written.get(key) == given.get(key) and type(written.get(key)) is type(given.get(key)), key
    assert logit_error(jaxlm.load(tmp_path / "out", devices=jax.devices()[:1]), name) <= 1e-4


FAMILY_TINY = {
    "mistral": ["model.family=mistral", "model.sliding_window=8", "data.seq_len=32"],
    "qwen3": ["model.family=qwen3", "model.head_dim=32", "model.tie_embeddings=true"],
    "gemma3": [
        *("model.family=gemma3", "model.sliding_window=8", "model.sliding_window_pattern=2"),
        *(
            "model.rope_scaling_factor=8",
            "model.query_pre_attn_scalar=24",
            "model.final_logit_softcapping=30",
        ),
        "model.attn_logit_softcapping=50",
    ],
    "mixtral": ["model.family=mixtral", "model.num_experts=4", "model.router_z_weight=0.001"],
    "deepseek_v3": [
        *("model.family=deepseek_v3", "model.num_experts=4", "model.mlp_dim=32", "model.q_lora_rank=32"),
        *(
            "model.kv_lora_rank=16",
            "model.qk_nope_head_dim=16",
            "model.qk_rope_head_dim=8",
            "model.v_head_dim=16",
        ),
        *("model.first_k_dense_replace=1", "model.dense_mlp_dim=128", "model.expert_groups=2"),
    ],
}


SPLITS = {
    "data": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "context": ["mesh.context=2", "mesh.fsdp=2", "mesh.tensor=2"],
}


# Context parallelism lays rows out in load-balanced order: the windows must hold in it.
@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("mistral", "data"),
        ("mistral", "context"),
        ("qwen3", "data"),
        ("gemma3", "context"),
        ("mixtral", "data"),
        ("deepseek_v3", "data"),
    ],
)
def test_a_mesh_split_trains_to_the_single_device_losses(tmp_path, name, split):
    steps = ["train.steps=3", *FAMILY_TINY[name]]
    train(tiny_config(tmp_path / "one", *steps, "mesh.fsdp=1"), devices=jax.devices()[:1])
    train(tiny_config(tmp_path / "split", *steps, *SPLITS[split], "checkpoint.every=3"))
    one, split = train_losses(tmp_path / "one"), train_losses(tmp_path / "split")
    assert one.keys() == split.keys() == {1, 2, 3}
    for step, loss in split.items():
        assert abs(loss - one[step]) / one[step] < 1e-5, step
    if name == "deepseek_v3":  # 3 steps moved each expert's balancing bias by ±0.001 each, or not
        bias = np.asarray(jaxlm.load(tmp_path / "split").params["blocks"]["mlp"]["router_bias"][...])
        assert bias.shape == (1, 4) and set(np.round(bias.ravel() / 0.001).tolist()) <= {
            -3,
            -2,
            -1,
            0,
            1,
            2,
            3,
        }
        assert bias.min() < 0 < bias.max()
    if name == "mixtral":  # its auxiliary losses and the experts' load, in every step's record
        for record in (r for r in read_metrics(tmp_path / "split") if "loss" in r):
            assert record["aux/load_balance"] > 0 and record["aux/router_z"] > 0
            assert record["moe/load_max"] >= 1 >= record["moe/load_min"] >= 0 and record["moe/dropped"] == 0


def test_a_key_of_another_family_names_the_family_that_has_it(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^model.sliding_window is a key of model.family=mistral, not of llama; set model.family=mistral or drop it$",
    ):
        tiny_config(tmp_path, "model.sliding_window=8")


def test_splash_computes_the_window_and_a_kernel_without_the_soft_cap_is_refused_in_one_line(tmp_path):
    splash = ["attention.kernel=splash", "attention.splash_interpret=true", "data.seq_len=128"]
    windowed = tiny_config(tmp_path, *FAMILY_TINY["mistral"], *splash)
    assert build_model(windowed, jax.devices()[:1]).attention == "splash"  # tests/test_splash.py: its numbers
    with pytest.raises(
        ConfigError,
        match=r"^attention.kernel=splash does not compute the soft-capping of attention scores at 50.0 "
        r"model.family=gemma3 asks for; use attention.kernel=xla \(or auto\)$",
    ):
        build_model(tiny_config(tmp_path, *FAMILY_TINY["gemma3"], *splash), jax.devices()[:1])


def test_lora_fine_tunes_a_mixture_of_experts_on_its_attention_and_exports_peft_adapters(tmp_path):
    run = tmp_path / "lora"
    overrides = [f"model.init_from={FIXTURES / 'mixtral'}", "optim.lora.rank=4", "optim.lr=1e-2"]
    train(tiny_config(run, *overrides, "train.steps=2", "checkpoint.every=2"), devices=jax.devices()[:1])
    source = open_source(run)
    params, with_adapters = source.read_adapters(build_model(source_config(source), jax.devices()[:1]))
    trained, base = split_adapters(params)
    assert sorted(trained["blocks"]["attention"]["lora"]) == ["wk", "wo", "wq", "wv"]
    assert "lora" not in base["blocks"]["mlp"]  # the experts are frozen, and have no adapters
    export_adapter(run, tmp_path / "adapter", devices=jax.devices()[:1])
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    read = read_adapter(tmp_path / "adapter", with_adapters)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, split_adapters(read)[0], trained))


def test_latent_attention_takes_splash_but_not_cudnn(tmp_path):
    """Splash's numbers: tests/test_mla.py. cuDNN is refused in one line naming this need."""
    needs = registry.get("deepseek_v3").attention(tiny_config(tmp_path, *FAMILY_TINY["deepseek_v3"]).model)
    assert _unmet_needs(needs, "cudnn") == "latent attention (values narrower than keys)"
    assert _unmet_needs(needs, "splash") == ""


def test_a_quantized_deepseek_v3_checkpoint_is_one_line():
    given = json.loads((FIXTURES / "deepseek_v3/config.json").read_text())
    assert deepseek_v3.config_from_hf(given)["first_k_dense_replace"] == 1
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with pytest.raises(
        UserError, match=r"^config.json has quantization_config \(fp8 e4m3\): the weights are quantized"
    ):
        deepseek_v3.config_from_hf({**given, "quantization_config": fp8})


def test_the_routers_balancing_bias_moves_toward_balance():
    """DeepSeek-V3's auxiliary-loss-free balancing, one step of it: +rate for an expert given less
    than an even share of the step's assignments, -rate for more, 0 for exactly even (a trained
    run's: the mesh-split test's checkpoint)."""
    load = jnp.asarray([[0.5, 0.25, 0.25, 0.0]])
    np.testing.assert_allclose(moe.balanced_bias(jnp.zeros((1, 4)), load, 0.01), [[-0.01, 0, 0, 0.01]])


def test_more_experts_per_token_than_experts_is_one_line(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model.experts_per_token=5 is more than model.num_experts=4; choose at most 4",
    ):
        tiny_config(tmp_path, "model.family=mixtral", "model.num_experts=4", "model.experts_per_token=5")


def test_a_qwen3_moe_with_dense_layers_among_the_mixtures_is_one_line():
    given = json.loads((FIXTURES / "qwen3_moe/config.json").read_text())
    assert qwen3_moe.config_from_hf(given)["num_experts"] == 8
    with pytest.raises(
        UserError, match=r"has decoder_sparse_step=2 and mlp_only_layers=\[1\]; jaxlm reads Qwen3-MoE"
    ):
        qwen3_moe.config_from_hf({**given, "decoder_sparse_step": 2, "mlp_only_layers": [1]})


def test_a_checkpoint_of_one_family_resumes_as_no_other(tmp_path):
    steps = ["train.steps=1", "checkpoint.every=1", "mesh.fsdp=1"]
    train(tiny_config(tmp_path, *steps, *FAMILY_TINY["qwen3"]), devices=jax.devices()[:1])
    other = tiny_config(
        tmp_path, "train.steps=2", "mesh.fsdp=1", "model.family=mistral", "model.sliding_window=8"
    )
    with pytest.raises(
        UserError, match=r"was saved with a different model \(model.family, model.head_dim, .*differ\)"
    ):
        train(other, devices=jax.devices()[:1])


def test_a_source_of_one_family_starts_no_run_of_another(tmp_path):
    config = tiny_config(tmp_path, f"model.init_from={FIXTURES / 'mistral'}", "model.family=qwen3")
    with pytest.raises(
        ConfigError,
        match=r"^model.family=qwen3, and model.init_from=.*mistral is a mistral model; drop model.family",
    ):
        apply_init_from(config)
