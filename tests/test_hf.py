"""Hugging Face weights in and out. Imported models give transformers' logits (the fixtures: tiny
random models saved by transformers, with its float32 logits on a 600-token prompt, made by
tests/fixtures/hf/make_fixtures.py), on one device and on a tensor × FSDP mesh; import → export →
import is bitwise; a run trained on a tensor-parallel mesh exports and loads back; model.init_from
trains from an HF directory or a jaxlm run, and a restart resumes from the run's own checkpoints;
bad input is one line."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY, tiny_config, train_losses
from flax import nnx
from safetensors import safe_open

import jaxlm
from jaxlm.config import config_from_dict
from jaxlm.data import pipeline
from jaxlm.errors import ConfigError, UserError
from jaxlm.hf.read import read_block
from jaxlm.hf.write import byte_tokenizer_json
from jaxlm.inference import loading
from jaxlm.inference.export import export
from jaxlm.inference.loading import apply_init_from, open_source
from jaxlm.model import registry
from jaxlm.training.step import _loss_fn
from jaxlm.training.train import _data, train

FIXTURES = REPO / "tests/fixtures/hf"
ARCHITECTURES = ["llama2", "llama3", "llama3_1", "llama3_2", "qwen2"]


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"{name}.reference.npz"))


@jax.jit
def _forward(graphdef, params, tokens):  # tokens: [1, length]
    positions = jnp.arange(tokens.shape[1])[None]
    logits = nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens)).logits
    return logits[0]


def logit_error(loaded: jaxlm.inference.loading.Loaded, name: str) -> float:
    """Largest difference from transformers' logits on the fixture's prompt, relative to the
    largest logit."""
    expected = reference(name)
    tokens = jnp.asarray(expected["prompt_ids"])[None]
    logits = np.asarray(_forward(loaded.setup.graphdef, loaded.params, tokens))[expected["logit_positions"]]
    return float(np.abs(logits - expected["logits"]).max() / np.abs(expected["logits"]).max())


def assert_logits_equal_transformers(loaded: jaxlm.inference.loading.Loaded, name: str) -> None:
    assert logit_error(loaded, name) <= 1e-4, name


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_imported_models_give_transformers_logits_on_a_600_token_prompt(name):
    loaded = jaxlm.load(FIXTURES / name, devices=jax.devices()[:1])
    assert_logits_equal_transformers(loaded, name)
    expected = reference(name)
    assert loaded.eos_ids == tuple(expected["eos_ids"])
    bos = [] if loaded.bos_id is None else [loaded.bos_id]  # transformers' tokenizer adds it
    prompt = [*bos, *loaded.tokenizer.encode(str(expected["prompt_text"]))][:600]
    assert prompt == expected["prompt_ids"].tolist()
    mixed = [*bos, *loaded.tokenizer.encode(str(expected["mixed_text"]))]  # non-ASCII, EOS written in it
    assert mixed == expected["mixed_text_ids"].tolist()
    assert loaded.tokenizer.eos_id == expected["eos_ids"][0]  # documents end as the model's do


def test_llama3_rope_scaling_is_what_makes_llama3_1_agree():
    # The prompt runs past the model's original 128 positions: without the scaling it differs.
    loaded = jaxlm.load(
        FIXTURES / "llama3_1", devices=jax.devices()[:1], overrides=["model.rope_scaling=null"]
    )
    assert logit_error(loaded, "llama3_1") > 0.1


@pytest.mark.parametrize("name", ["llama3_1", "qwen2"])
def test_imported_models_give_transformers_logits_on_a_tensor_and_fsdp_mesh(name):
    loaded = jaxlm.load(FIXTURES / name, overrides=["mesh.tensor=2", "mesh.fsdp=4"])
    wq = loaded.params["blocks"]["attention"]["wq"]
    assert (
        tuple(wq.sharding.spec) == (None, ("fsdp", "context"), "tensor", None)
        and len(wq.sharding.device_set) == 8
    )
    assert_logits_equal_transformers(loaded, name)


class RecordedSlice:
    """A safetensors slice that notes the index of every read."""

    def __init__(self, tensor_slice):
        self.tensor_slice, self.reads = tensor_slice, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.tensor_slice[index]


def test_a_shard_reads_only_the_block_of_the_tensor_it_holds():
    config = config_from_dict({"model": open_source(FIXTURES / "llama3").model}).model
    wq = next(t for t in registry.family_of(config).hf.tensors(config) if t.param == "blocks.attention.wq")
    name = "model.layers.1.self_attn.q_proj.weight"
    with safe_open(FIXTURES / "llama3/model.safetensors", framework="numpy") as handle:
        whole = handle.get_tensor(name)  # [heads × head_dim, embed] = [128, 64]
        recorded = RecordedSlice(handle.get_slice(name))
        block = read_block(recorded, wq, [slice(16, 48), slice(1, 3), slice(8, 24)])  # embed, heads, head_dim
    expected = whole.reshape(4, 32, 64).transpose(2, 0, 1)[16:48, 1:3, 8:24]
    assert np.array_equal(block, expected)
    assert recorded.reads == [(slice(32, 96), slice(16, 48))]  # the rows of heads 1-2, a half of embed


def read_tensors(directory) -> dict[str, np.ndarray]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        with safe_open(directory / file, framework="numpy") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safe_open is no dict)
    return tensors


def single_file_tensors(directory) -> dict[str, np.ndarray]:
    with safe_open(directory / "model.safetensors", framework="numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safe_open is no dict)


@pytest.mark.parametrize("name", ["llama2", "llama3_1", "llama3_2", "qwen2"])
def test_import_export_import_gives_back_the_same_tensors_bitwise(name, tmp_path):
    source = FIXTURES / name
    export(source, tmp_path / "out", devices=jax.devices()[:4], max_shard_bytes=100_000)
    out = tmp_path / "out"
    original = (
        read_tensors(source)
        if (source / "model.safetensors.index.json").exists()
        else single_file_tensors(source)
    )
    exported = read_tensors(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a plain directory, not a private temporary one
    assert exported.keys() == original.keys()
    for tensor, value in original.items():
        assert exported[tensor].dtype == value.dtype and np.array_equal(exported[tensor], value), tensor
    written, given = (json.loads((d / "config.json").read_text()) for d in (out, source))
    for key in (
        "architectures",
        "hidden_size",
        "num_key_value_heads",
        "intermediate_size",
        "tie_word_embeddings",
        "eos_token_id",
    ):
        assert written[key] == given[key], key
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    again = jaxlm.load(out, devices=jax.devices()[:1])
    assert_logits_equal_transformers(again, name)


def test_export_writes_rope_scaling_in_the_forms_of_transformers_4_and_5(tmp_path):
    export(FIXTURES / "llama3_1", tmp_path / "out", devices=jax.devices()[:1], dtype="bfloat16")
    config = json.loads((tmp_path / "out/config.json").read_text())
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}
    assert config["max_position_embeddings"] == 1024 and config["torch_dtype"] == "bfloat16"
    exported = read_tensors(tmp_path / "out")
    original = single_file_tensors(FIXTURES / "llama3_1")
    assert all(value.dtype == jnp.bfloat16 for value in exported.values())
    name = "model.layers.1.self_attn.k_proj.weight"
    assert np.array_equal(exported[name], original[name].astype(jnp.bfloat16))
    again = jaxlm.load(tmp_path / "out", devices=jax.devices()[:1])  # kept in the dtype it was saved in
    assert again.config.model.param_dtype == "bfloat16"
    assert again.params["blocks"]["attention"]["wk"].dtype == jnp.bfloat16
    export(tmp_path / "out", tmp_path / "again", devices=jax.devices()[:1])
    assert all(
        np.array_equal(read_tensors(tmp_path / "again")[name], value) for name, value in exported.items()
    )
    for old_form in (False, True):  # both forms read back to the same model keys
        if old_form:
            config.pop("rope_parameters")
        (tmp_path / "out/config.json").write_text(json.dumps(config))
        assert open_source(tmp_path / "out").model["rope_scaling"]["factor"] == 8.0


def test_the_byte_tokenizer_exports_as_an_equivalent_tokenizer_json():
    from tokenizers import Tokenizer

    from jaxlm.data.tokenizers import ByteTokenizer

    text = "naïve café, 你好\tdef f(x):\n    return x  # ok"
    tokenizer = Tokenizer.from_str(byte_tokenizer_json())
    assert tokenizer.encode(text, add_special_tokens=False).ids == ByteTokenizer().encode(text).tolist()
    assert tokenizer.token_to_id("<|endoftext|>") == ByteTokenizer.eos_id
    assert tokenizer.decode(ByteTokenizer().encode(text).tolist()) == text


def jaxlm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """A tiny run trained on a 2-way tensor × 2-way FSDP mesh, with a checkpoint of step 4."""
    run_dir = tmp_path_factory.mktemp("tensor_parallel") / "run"
    train(
        tiny_config(run_dir, "checkpoint.every=4", "mesh.tensor=2", "mesh.fsdp=2"), devices=jax.devices()[:4]
    )
    return run_dir


def test_a_run_trained_on_a_tensor_parallel_mesh_exports_and_loads_back(tensor_parallel_run, tmp_path):
    result = jaxlm_cli("export-hf", str(tensor_parallel_run), str(tmp_path / "out"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    trained = jaxlm.load(tensor_parallel_run, devices=jax.devices()[:2])
    exported = jaxlm.load(tmp_path / "out", devices=jax.devices()[:1])
    assert exported.config.model.context_length == 32  # the run's data.seq_len
    for ours, theirs in zip(jax.tree.leaves(trained.params), jax.tree.leaves(exported.params), strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert exported.eos_ids == (256,) and exported.tokenizer.encode("ab").tolist() == [97, 98]
    assert json.loads((tmp_path / "out/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((tmp_path / "out/tokenizer_config.json").read_text()) == {"eos_token": "<|endoftext|>"}


@pytest.mark.multiprocess
def test_two_processes_export_what_they_import_bitwise(tmp_path):
    from test_multihost import free_port

    port, out = free_port(), tmp_path / "out"
    environment = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    distributed = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2"]
    command = [
        sys.executable,
        "-m",
        "jaxlm.cli",
        "export-hf",
        str(FIXTURES / "llama2"),
        str(out),
        *distributed,
    ]
    logs = [tmp_path / f"p{process}.log" for process in range(2)]
    processes = [
        subprocess.Popen(
            [*command, f"distributed.process_id={process}"], cwd=REPO, env=environment, stderr=log.open("w")
        )
        for process, log in enumerate(logs)
    ]
    for process, log in zip(processes, logs, strict=True):
        assert process.wait(timeout=300) == 0, log.read_text()
    exported, original = read_tensors(out), read_tensors(FIXTURES / "llama2")
    assert exported.keys() == original.keys()
    assert all(np.array_equal(exported[name], value) for name, value in original.items())


def test_a_step_directory_loads_like_its_run_and_a_missing_step_is_one_line(tensor_parallel_run):
    run = jaxlm.load(tensor_parallel_run, devices=jax.devices()[:1])
    step = jaxlm.load(tensor_parallel_run / "checkpoints/4", devices=jax.devices()[:1])
    for ours, theirs in zip(jax.tree.leaves(run.params), jax.tree.leaves(step.params), strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(UserError, match=r"has no checkpoint of step 3; it has steps 4$"):
        export(tensor_parallel_run, tensor_parallel_run.parent / "out", step=3)


def first_batch_loss(config, params, graphdef) -> float:
    """The loss of `params` on the first batch the run with `config` trains on."""
    tokenizer, corpus = _data(config)
    data = pipeline.HostBatches(corpus, config, tokenizer)
    try:
        batch = {field: jnp.asarray(value) for field, value in next(data).items()}
    finally:
        data.close()
    loss_sum, count, *_ = jax.jit(_loss_fn, static_argnums=0)(graphdef, params, batch)
    return float(loss_sum / count)


def init_from_config(run_dir, source, *overrides):
    return apply_init_from(
        tiny_config(run_dir, f"model.init_from={source}", "optim.lr=1e-3", "data.seq_len=64", *overrides)
    )


def test_init_from_a_hugging_face_model_trains_from_its_parameters(tmp_path, monkeypatch):
    overrides = ["train.steps=1", "checkpoint.every=1", "mesh.fsdp=2"]
    config = init_from_config(tmp_path / "run", FIXTURES / "qwen2", *overrides)
    assert config.model.qkv_bias and config.model.vocab_size == 320 and config.model.rope_theta == 1e6
    assert config.data.tokenizer == str(FIXTURES / "qwen2/tokenizer.json")
    imported = jaxlm.load(FIXTURES / "qwen2", devices=jax.devices()[:1])
    expected = first_batch_loss(config, imported.params, imported.setup.graphdef)
    # One trip: given the config as written, the run opens model.init_from once, for its
    # architecture, tokenizer and parameters.
    opened, real_open = [], loading.open_source
    monkeypatch.setattr(
        loading, "open_source", lambda path, *rest: opened.append(path) or real_open(path, *rest)
    )
    as_written = tiny_config(
        tmp_path / "run",
        f"model.init_from={FIXTURES / 'qwen2'}",
        "optim.lr=1e-3",
        "data.seq_len=64",
        *overrides,
    )
    train(as_written, devices=jax.devices()[:2])
    assert opened == [str(FIXTURES / "qwen2")]
    assert train_losses(tmp_path / "run")[1] == pytest.approx(expected, rel=1e-5)

    export(tmp_path / "run", tmp_path / "out", devices=jax.devices()[:1])  # as Qwen2, with its ids
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["eos_token_id"] == 317
    assert json.loads((tmp_path / "out/generation_config.json").read_text())["eos_token_id"] == 317
    assert (tmp_path / "out/tokenizer_config.json").read_bytes() == (
        FIXTURES / "qwen2/tokenizer_config.json"
    ).read_bytes()


def test_init_from_a_jaxlm_run_starts_from_its_checkpoint_on_another_mesh_and_restarts_from_its_own(
    tensor_parallel_run, tmp_path
):
    source = tmp_path / "source"
    shutil.copytree(tensor_parallel_run, source)
    config = init_from_config(
        tmp_path / "run", source, "model.num_layers=4", "train.steps=1", "checkpoint.every=1"
    )
    assert config.model.num_layers == 2 and config.data.tokenizer == "byte"
    previous = jaxlm.load(source, devices=jax.devices()[:1])
    expected = first_batch_loss(config, previous.params, previous.setup.graphdef)
    train(config, devices=jax.devices()[:1])
    assert train_losses(tmp_path / "run")[1] == pytest.approx(expected, rel=1e-5)

    shutil.rmtree(source)  # a restart reads its own checkpoints, never model.init_from
    again = init_from_config(
        tmp_path / "run", source, "model.num_layers=4", "train.steps=2", "checkpoint.every=1"
    )
    assert train(again, devices=jax.devices()[:1]).step == 2
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]


def test_init_from_takes_the_architecture_and_keeps_how_the_model_runs(tmp_path, caplog):
    config = tiny_config(
        tmp_path, f"model.init_from={FIXTURES / 'llama3_1'}", "model.dtype=bfloat16", "model.remat=full",
        "model.d_model=128", "data.tokenizer=byte",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="jaxlm"):
        resolved = apply_init_from(config)
    model = resolved.model
    assert (model.d_model, model.num_kv_heads, model.head_dim, model.vocab_size) == (64, 2, 32, 320)
    assert model.rope_scaling.original_max_position_embeddings == 128 and model.rope_theta == 500000.0
    assert (model.dtype, model.remat, resolved.data.tokenizer) == ("bfloat16", "full", "byte")
    lines = [record.message for record in caplog.records if "init_from" in record.message]
    assert len(lines) == 1 and "d_model 128 -> 64" in lines[0] and "dtype" not in lines[0]
    with pytest.raises(
        ConfigError, match=r"^model.d_model=128 on the command line disagrees with .*whose d_model is 64"
    ):
        apply_init_from(config, given={"model.d_model"})


def test_a_run_extending_the_context_sets_the_sources_rope_settings_its_own_way(tmp_path, caplog):
    scaling = "{type: llama3, factor: 4, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 128}"
    config = tiny_config(
        tmp_path, f"model.init_from={FIXTURES / 'llama3'}", "data.tokenizer=byte", "data.seq_len=512",
        "model.rope_theta=2000000", f"model.rope_scaling={scaling}", "model.context_length=512",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="jaxlm"):
        model = apply_init_from(config, given={"model.rope_theta", "model.rope_scaling"}).model
    assert model.rope_theta == 2e6 and model.rope_scaling.factor == 4 and model.context_length == 512
    assert model.d_model == 64  # the rest still comes from the source
    lines = [record.message for record in caplog.records if "this run sets" in record.message]
    assert len(lines) == 1 and "rope_theta 500000.0 -> 2000000.0" in lines[0]
    # Not set: the source's own.
    assert (
        apply_init_from(tiny_config(tmp_path, f"model.init_from={FIXTURES / 'llama3'}")).model.rope_theta
        == 5e5
    )


def broken_copy(tmp_path, name="llama2"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def edit_json(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def test_bad_hugging_face_directories_are_one_line_naming_the_problem(tmp_path):
    def refused(path, match):
        with pytest.raises(UserError, match=match) as error:
            jaxlm.load(path, devices=jax.devices()[:1])
        assert "\n" not in str(error.value)

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "is neither a Hugging Face model directory")
    model = broken_copy(tmp_path / "a")
    edit_json(model / "config.json", architectures=["FalconForCausalLM"])
    refused(
        model,
        r"architecture FalconForCausalLM is not supported; jaxlm reads .*LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, OlmoeForCausalLM, "
        r"Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM",
    )
    model = broken_copy(tmp_path / "b")
    (model / "model-00002-of-00003.safetensors").unlink()
    refused(model, r"names model-00002-of-00003.safetensors, missing from")
    model = broken_copy(tmp_path / "c")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(model, r"tensor model.layers.1.mlp.up_proj.weight is not in .*model-00001-of-00003.safetensors")
    model = broken_copy(tmp_path / "d")
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(model, "has no tensor model.layers.1.mlp.up_proj.weight")
    model = broken_copy(tmp_path / "e")
    edit_json(model / "config.json", intermediate_size=96)
    refused(
        model, r"tensor model.layers.0.mlp.gate_proj.weight in .* has shape \[128, 64\], expected \[96, 64\]"
    )
    model = broken_copy(tmp_path / "f")
    edit_json(model / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    refused(model, "RoPE scaling type 'yarn', which jaxlm does not implement; it reads default and llama3")
    model = broken_copy(tmp_path / "g", "qwen2")
    edit_json(model / "config.json", use_sliding_window=True)
    refused(model, "use_sliding_window=true; jaxlm reads Qwen2 models with full attention only")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {d_model: 64}\n")
    refused(run, "has no checkpoints")


def test_export_to_a_non_empty_out_dir_and_training_from_a_missing_init_from_are_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = jaxlm_cli("export-hf", str(FIXTURES / "qwen2"), str(out))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"error: {out} exists and is not an empty directory; choose a new OUT_DIR (nothing was written)"
        )
    )
    assert [path.name for path in tmp_path.iterdir()] == ["out"] and (out / "notes.txt").read_text() == "mine"
    result = jaxlm_cli(
        "train",
        "configs/tiny.yaml",
        *TINY,
        f"run.dir={tmp_path / 'run'}",
        "model.init_from=/nonexistent/model",
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "error: /nonexistent/model is neither a Hugging Face model directory (config.json) nor a jaxlm run directory (config.yaml, checkpoints/) nor one of its checkpoint steps; pass one of those"
        )
    )
