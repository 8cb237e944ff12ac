"""The GPT-2 family against transformers' GPT2LMHeadModel (the `gpt2` fixture of tests/fixtures/hf):
its logits on a 600-token prompt on one device, unrolled and on a tensor × FSDP mesh; greedy
generation through its KV cache, alone and in a padded batch; import → export → import bitwise.
Training on a mesh split gives one device's losses, LoRA trains only its adapters, rows laid out
for context parallelism give their own order's hidden states, configs/gpt2_small.yaml is GPT-2
small, and what it cannot do is one line."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY, train_losses
from flax import nnx
from safetensors import safe_open

import jaxlm
from jaxlm import parallel
from jaxlm.config import load_config
from jaxlm.errors import ConfigError, UserError
from jaxlm.hf.peft import read_adapter
from jaxlm.inference.export import export, export_adapter
from jaxlm.inference.generation import complete
from jaxlm.inference.loading import open_source, source_config
from jaxlm.model import gpt2, registry
from jaxlm.model.lora import combine, split_adapters
from jaxlm.training.setup import build_model
from jaxlm.training.train import train

FIXTURE = REPO / "tests/fixtures/hf/gpt2"
PEFT_FIXTURE = REPO / "tests/fixtures/peft/gpt2_lora"
REFERENCE = dict(np.load(REPO / "tests/fixtures/hf/gpt2.reference.npz"))
ONE_DEVICE = jax.devices()[:1]
# conftest's tiny model as a GPT-2 (which has no grouped-query attention).
GPT2_TINY = [
    *(key for key in TINY if not key.startswith("model.num_kv_heads")),
    "model.family=gpt2",
    "model.context_length=64",
]


def gpt2_config(run_dir, *overrides):
    return load_config(None, [*GPT2_TINY, f"run.dir={run_dir}", *overrides])


@jax.jit
def _forward(graphdef, params, tokens):  # tokens: [1, length]
    positions = jnp.arange(tokens.shape[1])[None]
    return nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens)).logits[0]


def logit_error(loaded) -> float:
    """Largest difference from transformers' logits on the 600-token prompt, relative to the
    largest logit."""
    tokens = jnp.asarray(REFERENCE["prompt_ids"])[None]
    logits = np.asarray(_forward(loaded.setup.graphdef, loaded.params, tokens))
    expected = REFERENCE["logits"]
    return float(np.abs(logits[REFERENCE["logit_positions"]] - expected).max() / np.abs(expected).max())


def until_eos(row: np.ndarray) -> list[int]:
    """transformers' greedy tokens up to the first EOS, where generation stops."""
    eos = np.isin(row, REFERENCE["eos_ids"])
    return row[: int(eos.argmax()) if eos.any() else len(row)].tolist()


@pytest.fixture(scope="module")
def one_device():
    return jaxlm.load(FIXTURE, devices=ONE_DEVICE)


def test_the_imported_model_gives_transformers_logits_and_tokens(one_device):
    assert one_device.config.model.family == "gpt2"
    assert one_device.config.model.mlp_dim == 256 and one_device.config.model.context_length == 1024
    assert logit_error(one_device) <= 1e-4
    assert one_device.eos_ids == tuple(REFERENCE["eos_ids"])
    ids = one_device.tokenizer.encode(str(REFERENCE["prompt_text"]))
    assert list(ids[:600]) == REFERENCE["prompt_ids"].tolist()  # no BOS: GPT-2's tokenizer adds none


def test_greedy_generation_is_transformers_token_for_token_alone_and_in_a_padded_batch(one_device):
    prompt = REFERENCE["greedy_prompt_ids"].tolist()
    [completion] = complete(one_device, [prompt], max_new_tokens=32, greedy=True)
    assert completion.token_ids == until_eos(REFERENCE["greedy_ids"])
    # Prompts of three lengths in one batch, left-padded to one length: each as it was alone.
    prompts = [REFERENCE[f"batch_prompt_{i}"].tolist() for i in range(3)]
    for i, completion in enumerate(complete(one_device, prompts, max_new_tokens=16, greedy=True)):
        assert completion.token_ids == until_eos(REFERENCE[f"batch_greedy_{i}"]), i


def test_transformers_logits_on_a_tensor_and_fsdp_mesh_and_with_unrolled_layers():
    loaded = jaxlm.load(FIXTURE, overrides=["mesh.tensor=2", "mesh.fsdp=4"])
    assert len(loaded.params["blocks"]["attention"]["wqkv"].sharding.device_set) == 8
    assert logit_error(loaded) <= 1e-4
    unrolled = jaxlm.load(FIXTURE, devices=ONE_DEVICE, overrides=["model.scan_layers=false"])
    assert logit_error(unrolled) <= 1e-4


def read_tensors(directory) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safe_open is no dict)
    return tensors


def test_import_export_import_gives_back_the_same_tensors_bitwise(tmp_path):
    export(FIXTURE, tmp_path / "out", devices=jax.devices()[:2])
    original, exported = read_tensors(FIXTURE), read_tensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    written, given = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "out", FIXTURE))
    for key in (
        "architectures",
        "model_type",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "activation_function",
    ):
        assert written[key] == given[key], key
    assert written["n_inner"] == 4 * given["n_embd"]  # the fixture's null, written out
    assert logit_error(jaxlm.load(tmp_path / "out", devices=ONE_DEVICE)) <= 1e-4


def test_a_checkpoint_without_the_transformer_prefix_reads_the_same(tmp_path):
    """The Hub's original GPT-2 files name their tensors `h.0.attn.c_attn.weight`, `wte.weight`
    (no `transformer.`), and hold the attention's mask buffers besides: read all the same."""
    import shutil

    from safetensors.numpy import save_file

    bare = tmp_path / "bare"
    shutil.copytree(FIXTURE, bare)
    tensors = {name.removeprefix("transformer."): value for name, value in read_tensors(FIXTURE).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    (bare / "model.safetensors").unlink()
    save_file(tensors, bare / "model.safetensors", metadata={"format": "pt"})
    assert logit_error(jaxlm.load(bare, devices=ONE_DEVICE)) <= 1e-4


def test_a_mesh_split_trains_to_the_single_device_losses(tmp_path):
    train(gpt2_config(tmp_path / "one", "train.steps=3", "mesh.fsdp=1"), devices=ONE_DEVICE)
    train(gpt2_config(tmp_path / "split", "train.steps=3", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    one, split = train_losses(tmp_path / "one"), train_losses(tmp_path / "split")
    assert one.keys() == split.keys() == {1, 2, 3}
    for step, loss in split.items():
        assert abs(loss - one[step]) / one[step] < 1e-5, step


def test_a_context_length_shorter_than_the_rows_stops_the_run_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as error:
        train(gpt2_config(tmp_path, "data.seq_len=128", "mesh.fsdp=1"), ONE_DEVICE)
    assert str(error.value) == (  # what the CLI prints (JAX adds its note on the traceback apart)
        "model.context_length=64 is shorter than rows of 128 tokens (data.seq_len); set "
        "model.context_length to at least 128 or lower data.seq_len"
    )


def test_lora_trains_the_fused_attention_adapters_and_exports_them_as_peft_conv1d_ones(tmp_path):
    run = tmp_path / "lora"
    overrides = [f"model.init_from={FIXTURE}", "optim.lora.rank=4", "train.steps=3", "checkpoint.every=3"]
    train(gpt2_config(run, *overrides, "optim.lr=1e-2"), ONE_DEVICE)
    assert all(math.isfinite(loss) for loss in train_losses(run).values())
    source = open_source(run)
    setup = build_model(source_config(source), ONE_DEVICE)
    params, with_adapters = source.read_adapters(setup)
    trained, base = split_adapters(params)
    assert list(trained["blocks"]["attention"]["lora"]) == ["wqkv"]  # the family's default target
    assert jnp.abs(trained["blocks"]["attention"]["lora"]["wqkv"]["b"]).max() > 0  # B starts at zero
    imported = open_source(FIXTURE).read_params(setup)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, base, imported))
    # PEFT adapts c_attn, a Conv1D [inputs, outputs], with fan_in_fan_out; read back, the same adapters.
    export_adapter(run, tmp_path / "adapter", devices=ONE_DEVICE)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]
    read = read_adapter(tmp_path / "adapter", with_adapters)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, split_adapters(read)[0], trained))


def test_peft_conv1d_adapters_read_by_jaxlm_give_peft_logits():
    """tests/fixtures/peft/gpt2_lora: PEFT's adapters of c_attn, c_fc and c_proj (which names the
    attention's and the MLP's both) on the gpt2 fixture, as jaxlm's wqkv, w_up, wo and w_down."""
    lora = ["optim.lora.rank=4", "optim.lora.alpha=8", "optim.lora.targets=[wqkv,wo,w_up,w_down]"]
    source = open_source(FIXTURE)
    setup = build_model(source_config(source, lora), ONE_DEVICE)
    params = combine(read_adapter(PEFT_FIXTURE, setup), source.read_params(setup))
    expected = dict(np.load(REPO / "tests/fixtures/peft/gpt2_lora.reference.npz"))
    tokens = jnp.asarray(expected["prompt_ids"])[None]
    logits = np.asarray(_forward(setup.graphdef, params, tokens))[expected["logit_positions"]]
    assert np.abs(logits - expected["logits"]).max() / np.abs(expected["logits"]).max() <= 1e-4
    # The same adapters asked for without the MLP's projection: PEFT's c_proj names it too.
    fewer = build_model(source_config(source, [*lora[:2], "optim.lora.targets=[wqkv,wo,w_up]"]), ONE_DEVICE)
    with pytest.raises(
        UserError,
        match=r"has target_modules=\['c_attn', 'c_fc', 'c_proj'\], and optim.lora asks "
        r"for \['attn.c_proj', 'c_attn', 'c_fc'\]",
    ):
        read_adapter(PEFT_FIXTURE, fewer)


def test_rows_laid_out_for_context_parallelism_give_the_hidden_states_of_their_own_order(one_device):
    graphdef, params = one_device.setup.graphdef, one_device.params
    length = 32
    tokens = jax.random.randint(jax.random.key(1), (2, length), 0, 320)
    segment_ids = jnp.asarray([[1] * 12 + [2] * 14 + [0] * 6] * 2)  # two documents, then padding
    positions = jnp.asarray([list(range(12)) + list(range(14)) + [0] * 6] * 2)
    order = parallel.load_balanced_order(length, 4)

    def hidden(params, tokens, positions, segment_ids, order=None):
        model = nnx.merge(graphdef, params)
        return model(tokens, positions, segment_ids, return_hidden=True, order=order).hidden

    in_order = jax.jit(hidden)
    natural = np.asarray(in_order(params, tokens, positions, segment_ids))[:, order]
    laid_out = jax.jit(functools.partial(hidden, order=order))(
        params, tokens[:, order], positions[:, order], segment_ids[:, order]
    )
    real = np.asarray(segment_ids[:, order] > 0)
    np.testing.assert_allclose(np.asarray(laid_out)[real], natural[real], atol=1e-5)
    unordered = in_order(params, tokens[:, order], positions[:, order], segment_ids[:, order])
    assert not np.allclose(np.asarray(unordered)[real], natural[real], atol=1e-3)  # the order matters


def test_configs_gpt2_small_is_gpt2_small_with_its_vocabulary_padded():
    config = load_config(REPO / "configs/gpt2_small.yaml").model
    params = nnx.state(registry.abstract_model(config), nnx.Param)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    padding = (50304 - 50257) * 768  # the embedding rows past GPT-2's vocabulary
    assert count - padding == 124_439_808  # GPT-2 small's parameters, as transformers counts them
    matmuls = 12 * (4 * 768**2 + 2 * 768 * 3072) + 768 * 50304
    assert gpt2.flops_per_token(config, 1024) == 6 * matmuls + 12 * 12 * 768 * 1024


def test_biases_norms_and_the_position_table_never_decay():
    config = gpt2.GPT2Config(family="gpt2", vocab_size=64, d_model=32, num_heads=4)
    params = nnx.to_pure_dict(nnx.state(registry.abstract_model(config), nnx.Param))
    decayed = {
        jax.tree_util.keystr(path, simple=True, separator=".")
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if gpt2.decays(jax.tree_util.keystr(path, simple=True, separator="."), False)
    }
    weights = ("attention.wqkv", "attention.wo", "mlp.w_up", "mlp.w_down")
    assert decayed == {f"blocks.{weight}" for weight in weights}
    assert gpt2.decays("embedding", True) and not gpt2.decays("position_embedding", True)


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ({"activation_function": "relu"}, r"^config.json has activation_function=relu; jaxlm's GPT-2 MLP"),
        ({"scale_attn_by_inverse_layer_idx": True}, r"^config.json scales attention by other than"),
        ({"n_positions": None}, r"^config.json has no n_positions, which a GPT2LMHeadModel needs"),
    ],
)
def test_a_gpt2_config_json_jaxlm_cannot_compute_is_one_line(changed, expected):
    given = json.loads((FIXTURE / "config.json").read_text())
    with pytest.raises(UserError, match=expected) as error:
        gpt2.config_from_hf({**given, **changed})
    assert "\n" not in str(error.value)


def test_a_gpt2_without_tied_embeddings_or_with_uneven_heads_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"model.tie_embeddings=false: GPT-2 has no output projection"):
        gpt2_config(tmp_path, "model.tie_embeddings=false")
    with pytest.raises(ConfigError, match=r"model.d_model=64 is not divisible by model.num_heads=3"):
        gpt2_config(tmp_path, "model.num_heads=3")
