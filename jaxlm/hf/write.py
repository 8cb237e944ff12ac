"""Writing the Hugging Face format: sharded safetensors and their index from sharded parameters
(gathered to process 0's host one tensor, or one layer of a stacked parameter, at a time, whatever
the mesh), a staging directory beside the destination, its upload to a bucket, and jaxlm's byte
tokenizer as a tokenizer.json. What to write (a run's model, its config.json and tokenizer) is
jaxlm.inference.export's."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxlm import storage
from jaxlm.errors import UserError
from jaxlm.hf import files
from jaxlm.model.registry import HFTensor

log = logging.getLogger("jaxlm")

MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size


def upload(staging: Path, out) -> None:
    """Copy the files of `staging` to the gs:// directory `out`, config.json last: a directory
    without it is not a model, so an upload cut short is never taken for one."""
    names = sorted(path.name for path in staging.iterdir())
    names.sort(key=lambda name: name == files.CONFIG)
    for name in names:
        storage.upload(staging / name, str(out / name), "remove what was uploaded and export again")


def staging_directory(out: Path) -> Path:
    """A new hidden directory beside `out` to write into, with the permissions of a plain mkdir."""
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.partial-"))
    except OSError as error:
        raise UserError(f"{parent} cannot be written ({error.strerror}); choose a writable OUT_DIR") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def shard_plan(tensors: list[HFTensor], num_layers: int, itemsize: int, max_bytes: int) -> list[list[tuple]]:
    """(tensor, index, name) of each Hugging Face tensor in order (`HFTensor.names`), cut into
    files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for tensor in tensors:
        for index, name in tensor.names(num_layers):
            nbytes = math.prod(tensor.hf_shape) * itemsize
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((tensor, index, name))
            size += nbytes
    return shards


def write_tensors(
    params: Any,
    tensors: list[HFTensor],
    num_layers: int,
    mesh: Mesh,
    staging: Path | None,
    dtype: np.dtype,
    max_bytes: int,
) -> None:
    """The parameters, named and laid out as the family's table of Hugging Face `tensors` says, as
    sharded safetensors and their index in `staging` (process 0's; None on the others, which take
    part in gathering each tensor)."""
    shards = shard_plan(tensors, num_layers, dtype.itemsize, max_bytes)
    gather = gatherer(mesh)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor, index, name in shard:
            block = gather(_param(params, tensor.param), index)
            if staging is None:
                continue
            arrays[name] = np.ascontiguousarray(
                block.astype(dtype).transpose(np.argsort(tensor.order)).reshape(tensor.hf_shape)
            )
            weight_map[name] = file_name
            total += arrays[name].nbytes
        if staging is not None:
            save_file(arrays, staging / file_name, metadata={"format": "pt"})
    if staging is not None:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / files.INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _param(params: Any, path: str) -> jax.Array:
    for key in path.split("."):
        params = params[key]
    return params


def gatherer(mesh: Mesh):
    """(parameter, layer or (layer, expert) or None) → that layer of it (or all of it) on process 0's host. Within
    one process the host assembles it from the devices' shards; across processes it is gathered
    onto every device first (one tensor at a time)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    one_process = jax.process_count() == 1
    select = jax.jit(lambda stacked, index: stacked[index], out_shardings=None if one_process else replicated)
    whole = jax.jit(lambda array: array, out_shardings=replicated)

    def gather(param: jax.Array, layer: int | tuple[int, ...] | None) -> np.ndarray | None:
        if layer is not None:  # a layer, or (layer, expert)
            param = select(param, layer if isinstance(layer, tuple) else (layer,))
        elif not one_process:
            param = whole(param)
        if jax.process_index() != 0:
            return None
        return np.asarray(param) if one_process else np.asarray(param.addressable_data(0))

    return gather


def byte_tokenizer_json() -> str:
    """A tokenizer.json that encodes text as jaxlm's byte tokenizer does: UTF-8 bytes are ids
    0-255 and <|endoftext|> is 256. Byte-level BPE without merges: each byte stands for itself,
    as the printable character GPT-2's byte-level alphabet gives it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [byte for byte in range(256) if byte not in printable]
    characters = {byte: chr(byte) for byte in printable} | {
        byte: chr(256 + n) for n, byte in enumerate(others)
    }
    vocab = {characters[byte]: byte for byte in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer.to_str()
