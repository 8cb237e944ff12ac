"""A Hugging Face model directory: config.json, safetensors weights (one file, or shards with
their index), tokenizer and generation config. Everything is checked when it is opened, so a
broken directory is one line before any tensor is read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from jaxlm.errors import UserError

CONFIG, INDEX, SINGLE_FILE = "config.json", "model.safetensors.index.json", "model.safetensors"
GENERATION_CONFIG, TOKENIZER = "generation_config.json", "tokenizer.json"
# What transformers' tokenizers read besides tokenizer.json; copied along when present.
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json")


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

    def bos_id(self) -> int | None:
        """The beginning-of-sequence id of generation_config.json, else config.json's."""
        for source in (self.generation_config(), self.config):
            if source.get("bos_token_id") is not None:
                return source["bos_token_id"]
        return None

    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: generation_config.json's, else config.json's (an id or a list)."""
        for source in (self.generation_config(), self.config):
            ids = source.get("eos_token_id")
            if ids is not None:
                return tuple(ids) if isinstance(ids, list) else (ids,)
        return ()


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
