"""Config: YAML + dotted overrides, typed validation, one-line errors before any compile."""

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from jaxlm.config import Config, config_from_dict, load_config
from jaxlm.errors import ConfigError
from jaxlm.model import registry


def test_yaml_and_overrides_resolve_into_typed_sections():
    config = load_config(
        REPO / "configs/tiny.yaml", ["model.num_layers=4", "mesh.fsdp=4", "mesh.data=2", "train.steps=200"]
    )
    assert config.model.num_layers == 4
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, 4, 1)
    assert config.train.steps == 200
    assert config.model.head_dim == config.model.d_model // config.model.num_heads
    assert str(config.checkpoint_dir) == str(Path(config.run.dir).absolute() / "checkpoints")


def test_booleans_stay_booleans_where_a_key_takes_one():
    config = load_config(None, ["model.tie_embeddings=true", "checkpoint.async_save=false"])
    assert config.model.tie_embeddings is True and config.checkpoint.async_save is False


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_loads_and_its_resolved_form_reloads_the_same(path: Path):
    config = load_config(path)
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config


def test_override_values_are_parsed_as_yaml():
    config = load_config(
        None, ["model.tie_embeddings=true", "optim.lr=1e-3", "data.path=null", "mesh.rules.vocab=null"]
    )
    assert config.model.tie_embeddings is True
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.data.path is None
    assert config.mesh.rules["vocab"] is None
    assert config.mesh.rules["embed"] == ["fsdp", "context"]  # other rules keep their defaults


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.num_layerz=3"], r"model\.num_layerz is not a config key; did you mean model\.num_layers\?"),
        (["trian.steps=3"], r"trian is not a config key; did you mean train\?"),
        (["train.steps=abc"], r"train\.steps='abc' is invalid"),
        (["train.steps=0"], r"train\.steps=0 is invalid: input should be greater than 0"),
        (["model.dtype=float64"], r"model\.dtype='float64' is invalid"),
        (
            ["model.num_heads=4", "model.num_kv_heads=3"],
            r"model\.num_heads=4 is not a multiple of model\.num_kv_heads=3",
        ),
        (
            ["mesh.fsdp=-1", "mesh.data=-1"],
            r"only one of mesh\.data, mesh\.fsdp, mesh\.expert, mesh\.context, mesh\.tensor may be -1",
        ),
        (
            ["mesh.rules.embedd=[fsdp]"],
            r"mesh\.rules\.embedd is not a logical axis of model\.family=llama; did you mean embed\?",
        ),
        (
            ["model.attention=xla"],
            r"^model\.attention is now attention\.kernel; write attention\.kernel='xla' instead$",
        ),
        (
            ["mesh.rules.expert=[tensor]"],
            r"^mesh\.rules\.expert is not a logical axis of model\.family=llama",
        ),
        (["mesh.rules.embed=[fsdq]"], r"'fsdq' is not a mesh axis"),
        (["train.global_batch_size=6", "train.micro_batches=4"], r"not divisible by train\.micro_batches=4"),
        (["train.steps"], r"not of the form section\.key=value"),
        (["train.loss_chunk=10"], r"train\.loss_chunk=10 does not divide data\.seq_len=128"),
        (["train.profile_steps=[5]"], r"train\.profile_steps=\[5\] must be \[first, last\]"),
        (["train=3"], r"train must be a section"),
        (["train.steps=true"], r"train\.steps=True is invalid: a boolean where a number belongs"),
        (["optim.lr=false"], r"optim\.lr=False is invalid: a boolean where a number belongs"),
        (["train.seed=-1"], r"train\.seed=-1 is invalid: input should be greater than or equal to 0"),
        (["train.seed=4294967296"], r"train\.seed=4294967296 is invalid: input should be less than"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(expected, message), message


def test_missing_or_malformed_config_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a directory; pass the path of a YAML file"):
        load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model: {}")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)


def test_resolved_config_round_trips_through_yaml():
    config = load_config(REPO / "configs/tiny.yaml", ["optim.schedule=wsd"])
    again = Config.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_every_config_key_is_documented():
    docs = (REPO / "docs/configuration.md").read_text()
    config = Config()
    for section_name in type(config).model_fields:
        section = getattr(config, section_name)
        for key in type(section).model_fields:
            assert f"`{section_name}.{key}`" in docs, (
                f"{section_name}.{key} is missing from docs/configuration.md"
            )
    for name in registry.names():  # every family's own keys too
        for key in registry.get(name).config.model_fields:
            assert f"`model.{key}`" in docs, (
                f"model.{key} of model.family={name} is missing from docs/configuration.md"
            )


def test_an_unknown_model_family_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"^model.family=gpt5 is not a model family; use one of .*llama"):
        load_config(None, ["model.family=gpt5"])


def test_llama_keys_are_checked_and_suggested_like_any_other():
    with pytest.raises(
        ConfigError, match=r"^model.num_head is not a config key; did you mean model.num_heads\?$"
    ):
        load_config(None, ["model.num_head=4"])
    config = load_config(None, ["model.num_heads=8", "model.d_model=256"])
    assert config.model.family == "llama" and config.model.head_dim == 32
