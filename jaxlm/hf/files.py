"""A Hugging Face model directory: config.json, safetensors weights (one file, or shards with
their index), tokenizer and generation config. Everything is checked when it is opened, so a
broken directory is one line before any tensor is read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
from safetensors import safe_open

from jaxlm.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as Vocabulary

CONFIG, INDEX, SINGLE_FILE = "config.json", "model.safetensors.index.json", "model.safetensors"
GENERATION_CONFIG, TOKENIZER = "generation_config.json", "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# What transformers' tokenizers read besides tokenizer.json; copied along when present.
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG, "special_tokens_map.json")
# The files of a model directory that name its special tokens.
NAMING_FILES = (CONFIG, GENERATION_CONFIG, TOKENIZER_CONFIG)


def is_hf_directory(path: str | Path) -> bool:
    """Whether `path` looks like a Hugging Face model directory (it has a config.json)."""
    return (Path(path) / CONFIG).is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read as JSON ({error}); is the download complete?") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds {type(value).__name__}, not a JSON object; is it the right file?")
    return value


@dataclass
class HFDirectory:
    """An opened Hugging Face model directory: its config and where each tensor is."""

    path: Path
    config: dict[str, Any]  # config.json
    files: dict[str, Path]  # tensor name → the safetensors file that holds it
    shapes: dict[str, tuple[int, ...]]  # tensor name → its shape, from the file headers

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    @property
    def tokenizer(self) -> Path | None:
        path = self.path / TOKENIZER
        return path if path.is_file() else None

    def generation_config(self) -> dict[str, Any]:
        path = self.path / GENERATION_CONFIG
        return read_json(path) if path.is_file() else {}

    def special_tokens(self) -> SpecialTokens:
        """Its end- and beginning-of-sequence tokens as its files name them (`special_tokens`)."""
        return special_tokens(self.path, read_tokenizer(self.tokenizer) if self.tokenizer else None)

    def sampling_defaults(self) -> SamplingDefaults:
        """How generation_config.json says to draw tokens (all None where the file says nothing)."""
        path = self.path / GENERATION_CONFIG
        try:
            return SamplingDefaults.model_validate(self.generation_config())
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            raise UserError(
                f"{path} has {key}={first['input']!r} ({first['msg'].lower()}); correct it there"
            ) from None


class SamplingDefaults(pydantic.BaseModel, frozen=True, extra="ignore"):
    """A model's sampling settings, as transformers reads them from generation_config.json:
    do_sample false is greedy. None: the file does not say."""

    do_sample: pydantic.StrictBool | None = None
    temperature: float | None = pydantic.Field(None, ge=0)
    top_k: int | None = pydantic.Field(None, ge=0)
    top_p: float | None = pydantic.Field(None, gt=0, le=1)


UNSET_SAMPLING = SamplingDefaults()  # a model without generation_config.json: jaxlm's defaults


@dataclass(frozen=True)
class SpecialTokens:
    """A model's special tokens as its directory's files name them, as ids of its tokenizer.json."""

    eos_token: str | None  # the end-of-document token training documents end with; None: unnamed
    eos_ids: tuple[int, ...]  # generation stops at any of these
    bos_id: int | None  # the token its prompts start with, if any


def names_special_tokens(directory: Path) -> bool:
    """Whether `directory` holds a file that can name special tokens (NAMING_FILES)."""
    return any((directory / name).is_file() for name in NAMING_FILES)


def special_tokens(directory: Path, vocabulary: Vocabulary | None) -> SpecialTokens:
    """What config.json, generation_config.json and tokenizer_config.json in `directory` say the
    special tokens are, checked against `vocabulary` (its tokenizer.json; None: the ids are taken
    as they are and tokenizer_config.json's token names left out). Generation stops at
    generation_config.json's eos_token_id (one or several), else config.json's, else at the
    end-of-document token: tokenizer_config.json's eos_token, else config.json's first
    eos_token_id, else generation_config.json's first. BOS: tokenizer_config.json's bos_token,
    else config.json's bos_token_id, else generation_config.json's."""
    named = _NamedTokens(directory, vocabulary)
    stop_ids = named.ids(GENERATION_CONFIG, "eos_token_id") or named.ids(CONFIG, "eos_token_id")
    eos_id = _first(named.token_id("eos_token"), *named.ids(CONFIG, "eos_token_id"), *stop_ids)
    bos_id = _first(
        named.token_id("bos_token"),
        *named.ids(CONFIG, "bos_token_id"),
        *named.ids(GENERATION_CONFIG, "bos_token_id"),
    )
    eos_token = vocabulary.id_to_token(eos_id) if vocabulary is not None and eos_id is not None else None
    return SpecialTokens(eos_token, stop_ids or tuple(i for i in [eos_id] if i is not None), bos_id)


def read_tokenizer(path: Path) -> Vocabulary:
    """A tokenizer.json read by the `tokenizers` library; a UserError if it cannot be."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise UserError(
            f"{path} cannot be read as a tokenizer.json ({error}); is the download complete?"
        ) from None


class _NamedTokens:
    """The special tokens one directory's files name, each checked against its tokenizer.json."""

    def __init__(self, directory: Path, vocabulary: Vocabulary | None):
        self.directory, self.vocabulary = directory, vocabulary
        self.files = {
            name: read_json(directory / name) if (directory / name).is_file() else {} for name in NAMING_FILES
        }

    def ids(self, file: str, key: str) -> tuple[int, ...]:
        """The ids that `key` of `file` names (an id or a list of them); () where it names none."""
        value = self.files[file].get(key)
        if value is None:
            return ()
        ids = value if isinstance(value, list) else [value]
        path = self.directory / file
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise UserError(
                f"{path} has {key}={value!r}, which is not a token id or a list of them; correct it"
            )
        unknown = [i for i in ids if self.vocabulary is not None and self.vocabulary.id_to_token(i) is None]
        if unknown:
            token = "end-of-sequence" if key == "eos_token_id" else "beginning-of-sequence"
            raise UserError(
                f"{path} has {key}={value!r}, but {self.directory / TOKENIZER} has no token {unknown[0]}; "
                f"set {key} there to the id of its {token} token"
            )
        return tuple(ids)

    def token_id(self, key: str) -> int | None:
        """The id of the token that tokenizer_config.json's `key` names (its text, or a dict with
        the text as "content"); None where it names none."""
        value = self.files[TOKENIZER_CONFIG].get(key)
        text = value.get("content") if isinstance(value, dict) else value
        if text is None or self.vocabulary is None:
            return None
        path = self.directory / TOKENIZER_CONFIG
        if not isinstance(text, str):
            raise UserError(f"{path} has {key}={value!r}, which is not a token; write the token's text")
        token_id = self.vocabulary.token_to_id(text)
        if token_id is None:
            raise UserError(
                f"{path} names {key} {text!r}, which {self.directory / TOKENIZER} does not have; set "
                f"{key} there to the token it has"
            )
        return token_id


def _first(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


def open_hf_directory(path: str | Path) -> HFDirectory:
    """Open and check a Hugging Face model directory; UserError (one line) if it is not one."""
    path = Path(path)
    if not is_hf_directory(path):
        raise UserError(
            f"{path} is not a Hugging Face model directory (no {CONFIG}); pass one with config.json and "
            "*.safetensors, or a jaxlm run directory"
        )
    config = read_json(path / CONFIG)
    architectures = config.get("architectures")
    if not architectures or not isinstance(architectures, list):
        raise UserError(f"{path / CONFIG} names no architectures; is it a transformers model's config?")
    files = _tensor_files(path)
    shapes = {}
    for file in sorted(set(files.values())):
        with _open(file) as handle:
            held = set(handle.keys())
            for name in (name for name, listed in files.items() if listed == file):
                if name not in held:
                    raise UserError(f"tensor {name} is not in {file}, where {path / INDEX} says it is")
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return HFDirectory(path, config, files, shapes)


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name → file: from the index of a sharded checkpoint, else model.safetensors's own."""
    index = path / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map; is the download complete?")
        missing = sorted({name for name in weight_map.values() if not (path / name).is_file()})
        if missing:
            raise UserError(
                f"{index} names {', '.join(missing)}, missing from {path}; download the missing shards"
            )
        return {tensor: path / name for tensor, name in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        raise UserError(
            f"{path} has no {SINGLE_FILE} or {INDEX}; jaxlm reads safetensors weights (convert "
            "PyTorch .bin files with transformers' save_pretrained)"
        )
    with _open(single) as handle:
        return dict.fromkeys(handle.keys(), single)


def _open(file: Path):
    """A safetensors file opened for reading; a UserError if it is not one."""
    try:
        return safe_open(file, framework="numpy")
    except Exception as error:
        raise UserError(
            f"{file} cannot be read as safetensors ({error}); is the download complete?"
        ) from None
