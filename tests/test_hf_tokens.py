"""What a Hugging Face directory says is read, not guessed: its end- and beginning-of-sequence
tokens come from its config.json, generation_config.json and tokenizer_config.json (a token no
guess would find, like DeepSeek's, included); generation stops at every end token
generation_config.json lists; model.init_from trains with the directory's end token; its
generation_config.json's sampling settings are generate's defaults, which the caller and the
command line override; a directory naming a token its tokenizer lacks is one line."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO

import jaxlm
from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.data.tokenizers import HuggingFaceTokenizer
from jaxlm.errors import UserError
from jaxlm.hf import files
from jaxlm.inference import generation
from jaxlm.inference.loading import apply_init_from

FIXTURES = REPO / "tests/fixtures/hf"
CUSTOM_EOS = "<｜end▁of▁sentence｜>"  # DeepSeek's, none of the names a bare tokenizer.json is searched for
ONE_DEVICE = jax.devices()[:1]


def copy_of(tmp_path, name="llama3"):
    directory = tmp_path / name
    shutil.copytree(FIXTURES / name, directory)
    return directory


def edit_json(path, **changes):
    """Set each key to its value; None removes the key."""
    value = json.loads(path.read_text()) if path.exists() else {}
    value.update(changes)
    path.write_text(json.dumps({key: item for key, item in value.items() if item is not None}))


def custom_eos_directory(tmp_path, eos_token=CUSTOM_EOS):
    """A copy of llama3 whose end-of-text token (318) is called CUSTOM_EOS, which its
    tokenizer_config.json names as `eos_token`."""
    directory = copy_of(tmp_path)
    path = directory / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    for token in tokenizer["added_tokens"]:
        if token["content"] == "<|end_of_text|>":
            token["content"] = CUSTOM_EOS
    vocab = tokenizer["model"]["vocab"]
    if "<|end_of_text|>" in vocab:
        vocab[CUSTOM_EOS] = vocab.pop("<|end_of_text|>")
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))
    edit_json(directory / "tokenizer_config.json", eos_token=eos_token)
    return directory


@pytest.mark.parametrize(
    "named_by", ["tokenizer_config.json's text and the ids", "tokenizer_config.json's dict alone"]
)
def test_a_directory_whose_end_token_no_guess_finds_loads_with_the_token_its_files_name(tmp_path, named_by):
    if named_by.endswith("alone"):
        directory = custom_eos_directory(tmp_path, {"__type": "AddedToken", "content": CUSTOM_EOS})
        for name in ("config.json", "generation_config.json"):
            edit_json(directory / name, eos_token_id=None)
    else:
        directory = custom_eos_directory(tmp_path)
    loaded = jaxlm.load(directory, devices=ONE_DEVICE)
    assert (loaded.tokenizer.eos_token, loaded.tokenizer.eos_id, loaded.eos_ids) == (CUSTOM_EOS, 318, (318,))
    assert loaded.config.data.eos_token == CUSTOM_EOS and loaded.bos_id == 317
    # Beside the directory's files a tokenizer.json says which token ends documents; alone it cannot.
    assert HuggingFaceTokenizer(str(directory / "tokenizer.json"), None).eos_id == 318
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(directory / "tokenizer.json", alone)
    with pytest.raises(UserError, match=r"has no end-of-document token among .*; set data.eos_token"):
        HuggingFaceTokenizer(str(alone / "tokenizer.json"), None)


def special_tokens_of(directory, **files_changes) -> files.SpecialTokens:
    for name, changes in files_changes.items():
        edit_json(directory / f"{name}.json", **changes)
    return files.special_tokens(directory, files.read_tokenizer(directory / "tokenizer.json"))


def test_the_files_name_the_tokens_in_order_of_precedence(tmp_path):
    # llama3: 317 <|begin_of_text|>, 318 <|end_of_text|>, 319 <|eot_id|>.
    directory = copy_of(tmp_path)
    assert special_tokens_of(directory) == files.SpecialTokens("<|end_of_text|>", (318,), 317)
    # Generation stops at generation_config.json's ids; documents end with tokenizer_config.json's.
    instruct = special_tokens_of(
        directory,
        generation_config={"eos_token_id": [318, 319]},
        tokenizer_config={"eos_token": "<|eot_id|>"},
    )
    assert instruct == files.SpecialTokens("<|eot_id|>", (318, 319), 317)
    # Without tokenizer_config.json's: config.json's first id ends documents, then generation_config.json's.
    edit_json(directory / "tokenizer_config.json", eos_token=None, bos_token=None)
    by_config = special_tokens_of(directory, config={"eos_token_id": [319, 318], "bos_token_id": None})
    assert by_config == files.SpecialTokens("<|eot_id|>", (318, 319), 317)  # BOS: generation_config.json's
    by_generation = special_tokens_of(directory, config={"eos_token_id": None})
    assert by_generation == files.SpecialTokens("<|end_of_text|>", (318, 319), 317)
    # Without generation_config.json's ids, generation stops at config.json's, else at the document end.
    by_config_alone = special_tokens_of(
        directory, config={"eos_token_id": 319}, generation_config={"eos_token_id": None}
    )
    assert by_config_alone == files.SpecialTokens("<|eot_id|>", (319,), 317)
    edit_json(directory / "config.json", eos_token_id=None)
    only_tokenizer = special_tokens_of(
        directory, tokenizer_config={"eos_token": "<|eot_id|>", "bos_token": None}
    )
    assert only_tokenizer == files.SpecialTokens("<|eot_id|>", (319,), 317)
    qwen2 = special_tokens_of(copy_of(tmp_path, "qwen2"))  # bos_token null, and no bos_token_id
    assert qwen2 == files.SpecialTokens("<|endoftext|>", (317,), None)


def test_generation_stops_at_every_end_token_generation_config_lists(tmp_path):
    # Like Llama 3 Instruct's [<|end_of_text|>, <|eot_id|>]: here two tokens the greedy
    # continuations of llama3_1's batch prompts reach, the first in row 0, the second in row 1.
    reference = np.load(FIXTURES / "llama3_1.reference.npz")
    greedy = [reference[f"batch_greedy_{i}"].tolist() for i in range(3)]
    assert (
        greedy[0][2] == 156
        and greedy[1][3] == 214
        and not {156, 214} & {*greedy[0][:2], *greedy[1][:3], *greedy[2]}
    )
    directory = copy_of(tmp_path, "llama3_1")
    edit_json(directory / "generation_config.json", eos_token_id=[156, 214])
    loaded = jaxlm.load(directory, devices=ONE_DEVICE)
    assert loaded.eos_ids == (156, 214) and loaded.tokenizer.eos_id == 318  # documents still end with 318
    prompts = [reference[f"batch_prompt_{i}"].tolist() for i in range(3)]
    completions = generation.complete(loaded, prompts, max_new_tokens=16, greedy=True)
    assert [(c.token_ids, c.finish_reason) for c in completions] == [
        (greedy[0][:2], "eos"),
        (greedy[1][:3], "eos"),
        (greedy[2], "length"),
    ]


def test_init_from_a_directory_trains_with_the_end_token_its_files_name(tmp_path):
    directory = custom_eos_directory(tmp_path)

    def init_from(*overrides):
        return apply_init_from(
            load_config(None, [f"model.init_from={directory}", f"run.dir={tmp_path / 'run'}", *overrides])
        )

    config = init_from()
    assert config.data.tokenizer == str(directory / "tokenizer.json") and config.data.eos_token == CUSTOM_EOS
    assert init_from("data.eos_token=<|eot_id|>").data.eos_token == "<|eot_id|>"  # set: it stays


def test_sampling_is_the_callers_else_the_models_else_jaxlms():
    chosen = generation.Sampling.chosen
    jaxlms, says = files.SamplingDefaults(), files.SamplingDefaults
    assert chosen(jaxlms) == generation.Sampling(temperature=1.0, top_k=0, top_p=1.0)
    assert chosen(jaxlms, greedy=True).temperature == 0
    model = says(do_sample=True, temperature=0.6, top_k=20, top_p=0.8)
    assert chosen(model) == generation.Sampling(0.6, 20, 0.8)
    assert chosen(model, temperature=1.0, top_p=1.0) == generation.Sampling(1.0, 20, 1.0)
    assert chosen(model, greedy=True).temperature == 0
    # do_sample false is greedy, unless the caller asks for sampling.
    assert chosen(says(do_sample=False)).temperature == 0
    assert chosen(says(do_sample=False), top_k=5) == generation.Sampling(1.0, 5, 1.0)
    assert chosen(says(do_sample=False, temperature=0.7), greedy=False).temperature == 0.7


def test_generation_config_sampling_settings_are_generates_defaults(tmp_path):
    directory = copy_of(tmp_path)
    edit_json(directory / "generation_config.json", do_sample=True, temperature=0.5, top_k=3)
    loaded = jaxlm.load(directory, devices=ONE_DEVICE)
    assert loaded.sampling == files.SamplingDefaults(do_sample=True, temperature=0.5, top_k=3)
    without = dataclasses.replace(loaded, sampling=files.UNSET_SAMPLING)  # as a jaxlm run
    prompts = ["def f(x):", "import os"]
    assert jaxlm.generate(loaded, prompts, max_new_tokens=8, seed=3) == jaxlm.generate(
        without, prompts, max_new_tokens=8, seed=3, temperature=0.5, top_k=3
    )


def test_the_command_line_overrides_the_models_sampling_settings(tmp_path, capsys):
    directory = copy_of(tmp_path)
    edit_json(directory / "generation_config.json", do_sample=False)
    loaded = jaxlm.load(directory)  # on every device, as the command line loads it

    def command_line(*options):
        capsys.readouterr()
        assert (
            cli.main(["generate", str(directory), "--prompt", "def f(x):", "--max-new-tokens", "8", *options])
            == 0
        )
        return capsys.readouterr().out

    (greedy,) = jaxlm.generate(loaded, ["def f(x):"], max_new_tokens=8, greedy=True)
    (sampled,) = jaxlm.generate(loaded, ["def f(x):"], max_new_tokens=8, temperature=1.0, seed=0)
    assert sampled != greedy
    assert command_line() == greedy + "\n"  # do_sample false: greedy
    assert command_line("--temperature", "1") == command_line("--no-greedy") == sampled + "\n"


def test_a_directory_naming_tokens_its_tokenizer_lacks_is_one_line(tmp_path):
    def refused(directory, match):
        with pytest.raises(UserError, match=match) as error:
            jaxlm.load(directory, devices=ONE_DEVICE)
        assert "\n" not in str(error.value)

    refused(
        custom_eos_directory(tmp_path / "a", eos_token="<|end_of_sentence|>"),
        r"tokenizer_config.json names eos_token '<\|end_of_sentence\|>', which .*tokenizer.json does not "
        r"have; set eos_token there to the token it has$",
    )
    directory = copy_of(tmp_path / "b")
    edit_json(directory / "generation_config.json", eos_token_id=[318, 400])
    refused(directory, r"generation_config.json has eos_token_id=\[318, 400\], but .* has no token 400; set")
    unnamed = custom_eos_directory(tmp_path / "c", eos_token=None)
    for name in ("config.json", "generation_config.json"):
        edit_json(unnamed / name, eos_token_id=None)
    refused(unnamed, r"names no end-of-sequence token .*; set eos_token in .*c/llama3/tokenizer_config.json")
    directory = copy_of(tmp_path / "d")
    edit_json(directory / "generation_config.json", top_p=1.5)
    refused(
        directory, r"generation_config.json has top_p=1.5 \(.*less than or equal to 1\); correct it there$"
    )
