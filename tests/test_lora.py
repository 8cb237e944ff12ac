"""LoRA (optim.lora): only the adapters train and hold optimizer state; a fresh adapter is the base
model; a run resumes exactly and reads back (generate, eval, export, init_from) as its merged
model; PEFT adapters come in with PEFT's logits and go out in PEFT's format (the fixture:
tests/fixtures/peft, made by its make_fixture.py with peft 0.21.2); bad input is one line, exit 2."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config, train_losses
from flax import nnx
from safetensors.numpy import load_file

import jaxlm
from jaxlm import cli
from jaxlm.errors import ConfigError, UserError
from jaxlm.hf.peft import read_adapter
from jaxlm.inference.export import export, export_adapter
from jaxlm.inference.loading import open_source, source_config
from jaxlm.model.lora import combine, split_adapters
from jaxlm.training.setup import build_model, build_train
from jaxlm.training.train import train

HF = REPO / "tests/fixtures/hf/llama3"
PEFT = REPO / "tests/fixtures/peft/llama3_lora"
# The fixture's LoraConfig in jaxlm's names: q, v, o of attention, gate and down of the MLP.
PEFT_LORA = ["optim.lora.rank=4", "optim.lora.alpha=8", "optim.lora.targets=[wq,wv,wo,w_gate,w_down]"]
ALL_TARGETS = "optim.lora.targets=[wq,wk,wv,wo,w_gate,w_up,w_down]"
ONE_DEVICE = jax.devices()[:1]


@jax.jit
def _logits(graphdef, params, tokens):  # tokens: [1, length] → [length, vocab]
    positions = jnp.arange(tokens.shape[1])[None]
    logits = nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens)).logits
    return logits[0]


def peft_logit_error(graphdef, params) -> float:
    """Largest difference from PEFT's logits on the fixture's prompt, relative to the largest."""
    expected = dict(np.load(REPO / "tests/fixtures/peft/llama3_lora.reference.npz"))
    logits = np.asarray(_logits(graphdef, params, jnp.asarray(expected["prompt_ids"])[None]))
    logits = logits[expected["logit_positions"]]
    return float(np.abs(logits - expected["logits"]).max() / np.abs(expected["logits"]).max())


def adapter_paths(tree) -> list[str]:
    return [
        jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in jax.tree.leaves_with_path(tree)
    ]


def test_only_the_adapters_have_optimizer_state_and_a_fresh_adapter_is_the_base_model(tmp_path):
    """The abstract train state: Adam moments for A and B of each adapted projection only."""
    config = tiny_config(tmp_path, "optim.lora.rank=4", ALL_TARGETS)
    setup = build_train(config, ONE_DEVICE)
    moments = setup.abstract_state.opt_state[1][0].mu
    assert adapter_paths(moments) == adapter_paths(split_adapters(setup.abstract_state.params)[0])
    assert all(".lora." in path for path in adapter_paths(moments)) and len(adapter_paths(moments)) == 14

    state = setup.init(jax.random.key(config.train.seed))
    plain = build_model(tiny_config(tmp_path), ONE_DEVICE)
    base = plain.init_params(jax.random.key(config.train.seed))
    assert jax.tree.all(jax.tree.map(jnp.array_equal, split_adapters(state.params)[1], base))
    tokens = jnp.arange(1, 33)[None] % 200
    np.testing.assert_array_equal(
        _logits(setup.model.graphdef, state.params, tokens), _logits(plain.graphdef, base, tokens)
    )


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run of 4 steps from the HF fixture (model.init_from) with LoRA dropout and micro-batches,
    checkpointed at steps 2 and 4, and a copy of it resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("lora_runs")
    common = [f"model.init_from={HF}", "optim.lora.rank=4", "optim.lora.dropout=0.2", ALL_TARGETS]
    common += ["train.micro_batches=2", "checkpoint.every=2", "mesh.fsdp=2", "optim.lr=1e-2"]
    train(tiny_config(root / "whole", *common), jax.devices()[:2])
    shutil.copytree(root / "whole", root / "resumed")
    shutil.rmtree(root / "resumed/checkpoints/4")
    train(tiny_config(root / "resumed", *common), jax.devices()[:2])
    return root


def test_a_lora_run_resumes_with_the_losses_of_one_that_never_stopped(resumed_run):
    whole, resumed = train_losses(resumed_run / "whole"), train_losses(resumed_run / "resumed")
    assert list(whole) == [1, 2, 3, 4]
    assert resumed == pytest.approx(whole, rel=1e-6)


def test_training_moves_the_adapters_and_leaves_the_base_weights_bitwise(resumed_run):
    source = open_source(resumed_run / "whole")
    setup = build_model(source_config(source), ONE_DEVICE)
    trained = source.read_adapters(setup)[0]
    adapters, base = split_adapters(trained)
    imported = open_source(HF).read_params(setup)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, base, imported))
    b_factors = [
        leaf
        for path, leaf in zip(adapter_paths(adapters), jax.tree.leaves(adapters), strict=True)
        if path.endswith(".b")
    ]
    assert len(b_factors) == 7 and all(jnp.abs(b).max() > 0 for b in b_factors)  # B starts at zero


def test_a_lora_run_reads_back_as_its_merged_model(resumed_run):
    """What generate, eval, export-hf and init_from read (`open_source(run).read_params`) is the
    base model with W + scale·A·B: the same logits as the base with its adapters beside it."""
    run = resumed_run / "whole"
    loaded = jaxlm.load(run, devices=ONE_DEVICE)
    assert "lora" not in json.dumps(jax.tree.map(lambda _: 0, loaded.params))
    source = open_source(run)
    config = source_config(source)
    with_adapters, adapters_setup = source.read_adapters(build_model(config, ONE_DEVICE))
    tokens = jnp.arange(3, 35)[None] % 300
    merged = _logits(loaded.setup.graphdef, loaded.params, tokens)
    beside = _logits(adapters_setup.graphdef, with_adapters, tokens)
    np.testing.assert_allclose(merged, beside, rtol=0, atol=1e-5 * float(jnp.abs(beside).max()))
    base = split_adapters(with_adapters)[1]
    assert not np.allclose(_logits(loaded.setup.graphdef, base, tokens), beside, atol=1e-3)


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """A run from the HF fixture (model.init_from) with the PEFT fixture's adapters
    (optim.lora.init_from), one step at learning rate 0 (the first warmup step): its checkpoint
    holds the PEFT adapters as they were read."""
    run = tmp_path_factory.mktemp("peft_run") / "run"
    overrides = [f"model.init_from={HF}", f"optim.lora.init_from={PEFT}", *PEFT_LORA]
    train(tiny_config(run, *overrides, "train.steps=1", "checkpoint.every=1", "data.seq_len=64"), ONE_DEVICE)
    return run


def test_peft_adapters_read_by_jaxlm_give_peft_logits():
    source = open_source(HF)
    setup = build_model(source_config(source, PEFT_LORA), ONE_DEVICE)
    params = combine(read_adapter(PEFT, setup), source.read_params(setup))
    assert peft_logit_error(setup.graphdef, params) <= 1e-4


def test_a_run_with_peft_adapters_loads_and_exports_merged_with_peft_logits(peft_run, tmp_path):
    loaded = jaxlm.load(peft_run, devices=ONE_DEVICE)  # as `jaxlm generate` and `jaxlm eval` do
    assert peft_logit_error(loaded.setup.graphdef, loaded.params) <= 1e-4
    export(peft_run, tmp_path / "merged", devices=ONE_DEVICE)
    exported = jaxlm.load(tmp_path / "merged", devices=ONE_DEVICE)
    assert peft_logit_error(exported.setup.graphdef, exported.params) <= 1e-4


def test_the_peft_export_gives_back_peft_tensors_and_config(peft_run, tmp_path):
    assert cli.main(["export-hf", str(peft_run), str(tmp_path / "adapter"), "--adapter"]) == 0
    written, original = (
        load_file(tmp_path / "adapter/adapter_model.safetensors"),
        load_file(PEFT / "adapter_model.safetensors"),
    )
    assert sorted(written) == sorted(original) and len(written) == 2 * 5 * 2
    for name, tensor in original.items():
        assert written[name].shape == tensor.shape and written[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    theirs = json.loads((PEFT / "adapter_config.json").read_text())
    for key in (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "bias",
        "fan_in_fan_out",
        "use_dora",
        "use_rslora",
    ):
        assert config[key] == theirs[key], key
    assert sorted(config["target_modules"]) == sorted(theirs["target_modules"])
    assert config["base_model_name_or_path"] == str(HF)
    # What jaxlm wrote, read again, is the adapter it exported.
    setup = build_model(source_config(open_source(HF), PEFT_LORA), ONE_DEVICE)
    again = read_adapter(tmp_path / "adapter", setup)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, again, read_adapter(PEFT, setup)))


def refused(argv: list[str], message: str) -> None:
    """`jaxlm ARGV` exits 2 with one line holding `message`, before compiling anything."""
    done = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *argv], capture_output=True, text=True, cwd=REPO
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and message in lines[-1], done.stderr
    assert not any("compiled" in line for line in lines), done.stderr


def test_a_lora_target_that_names_no_projection_and_a_rank_above_one_are_one_line_exit_2(tmp_path):
    train_args = ["train", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", "optim.lora.rank=4"]
    refused(
        [*train_args, "optim.lora.targets=[wq,q_proj]"],
        "error: optim.lora.targets names q_proj, which the llama family does not have; use some of wq, wk, "
        "wv, wo, w_gate, w_up, w_down",
    )
    refused(
        [*train_args, "optim.lora.rank=200", "optim.lora.targets=[w_up]"],
        "error: optim.lora.rank=200 is larger than projection w_up (128 inputs × 384 outputs); use a rank of "
        "at most 128",
    )
    with pytest.raises(
        ConfigError, match=r"optim.lora.init_from=\S+ needs optim.lora.rank > 0 and model.init_from"
    ):
        build_train(tiny_config(tmp_path, "optim.lora.rank=4", f"optim.lora.init_from={PEFT}"), ONE_DEVICE)
    with pytest.raises(
        UserError, match="is a Hugging Face model, not a jaxlm run that trained LoRA adapters"
    ):
        export_adapter(HF, tmp_path / "adapter", devices=ONE_DEVICE)


def test_an_adapter_export_of_a_run_without_lora_is_one_line_exit_2(resumed_run, tmp_path):
    run = tmp_path / "plain"
    train(tiny_config(run, "train.steps=1", "checkpoint.every=1"), ONE_DEVICE)
    with pytest.raises(
        UserError,
        match=r"has no LoRA adapters \(it was trained with optim.lora.rank=0\); export its whole model "
        "without --adapter",
    ):
        export_adapter(run, tmp_path / "adapter", devices=ONE_DEVICE)
    # Resuming a LoRA run with other adapters is refused too, naming both.
    overrides = [f"model.init_from={HF}", "optim.lora.rank=8", "train.steps=6", "optim.schedule_steps=4"]
    config = tiny_config(resumed_run / "whole", *overrides)
    with pytest.raises(UserError, match=r"saved with optim.lora.rank=4 .* asks for optim.lora.rank=8"):
        train(config, jax.devices()[:2])


def test_a_peft_adapter_of_another_rank_is_one_line(tmp_path):
    setup = build_model(source_config(open_source(HF), ["optim.lora.rank=8", *PEFT_LORA[1:]]), ONE_DEVICE)
    with pytest.raises(UserError, match=r"has r=4, and optim.lora asks for 8; set optim.lora"):
        read_adapter(PEFT, setup)


def test_model_flops_leave_out_the_frozen_weights_gradients(tmp_path):
    from jaxlm.model.decoder import matmul_params
    from jaxlm.training.metrics import model_flops_per_step

    full, adapted = tiny_config(tmp_path), tiny_config(tmp_path, "optim.lora.rank=2")
    tokens = full.train.global_batch_size * full.data.seq_len
    weight_gradients = 2 * matmul_params(full.model) * tokens  # 6N → 4N: no dW for a frozen W
    assert model_flops_per_step(full) - model_flops_per_step(adapted) == weight_gradients
