"""A jaxlm model out as a Hugging Face directory that transformers and vLLM load as they are:
config.json, sharded safetensors with their index, generation_config.json, tokenizer files.

Parameters come to process 0's host one tensor (one layer of a stacked parameter) at a time,
whatever the mesh; the directory is written beside OUT_DIR and renamed into place when complete,
so OUT_DIR never holds half an export."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxlm import storage
from jaxlm.errors import UserError
from jaxlm.hf import files
from jaxlm.loading import Source, open_source, source_config
from jaxlm.model.registry import HFTensor
from jaxlm.setup import ModelSetup, build_model

log = logging.getLogger("jaxlm")

MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size


def export(
    source_path: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    devices=None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Write the model at `source_path` (a jaxlm run or step directory, or a Hugging Face one) to
    `out_dir` as a Hugging Face directory, its tensors in `dtype` (default: its param_dtype)."""
    bucket = storage.is_bucket(str(out_dir))
    if bucket:
        storage.check_bucket(str(out_dir), "OUT_DIR")
    out = storage.path(str(out_dir)) if bucket else Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} exists and is not an empty directory; choose a new OUT_DIR (nothing was written)"
        )
    source = open_source(source_path, step)
    config = source_config(source)
    dtype = dtype or config.model.param_dtype
    setup = build_model(config, devices)
    params = source.read_params(setup)
    writing = jax.process_index() == 0
    staging = None
    if writing:  # a bucket cannot rename: written locally, then uploaded
        staging = Path(tempfile.mkdtemp(prefix="jaxlm-export-")) if bucket else staging_directory(out)
    try:
        write_tensors(params, setup, staging, jnp.dtype(dtype), max_shard_bytes)
        if writing:
            _write_metadata(source, setup, staging, dtype)
            if bucket:
                _upload(staging, out)
            else:
                os.replace(staging, out)  # over an empty OUT_DIR too
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging)
    multihost_utils.sync_global_devices("jaxlm export-hf done")
    at_step = "" if source.step is None else f" (step {source.step})"
    log.info("exported %s%s to %s, %s tensors", source_path, at_step, out, dtype)


def _upload(staging: Path, out) -> None:
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
    """(tensor, layer) pairs in Hugging Face order, cut into files of at most `max_bytes` (a
    larger tensor gets a file of its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for tensor in tensors:
        for layer in range(num_layers) if tensor.stacked else [None]:
            nbytes = math.prod(tensor.hf_shape) * itemsize
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((tensor, layer))
            size += nbytes
    return shards


def write_tensors(
    params: Any, setup: ModelSetup, staging: Path | None, dtype: np.dtype, max_bytes: int
) -> None:
    """The parameters as sharded safetensors and their index in `staging` (process 0's; None on
    the others, which take part in gathering each tensor)."""
    config = setup.model_config
    tensors = setup.family.hf.tensors(config)
    shards = shard_plan(tensors, config.num_layers, dtype.itemsize, max_bytes)
    gather = gatherer(setup)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor, layer in shard:
            block = gather(_param(params, tensor.param), layer)
            if staging is None:
                continue
            name = tensor.name.format(layer=layer)
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


def gatherer(setup: ModelSetup):
    """(parameter, layer or None) → that layer of it (or all of it) on process 0's host. Within
    one process the host assembles it from the devices' shards; across processes it is gathered
    onto every device first (one tensor at a time)."""
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    one_process = jax.process_count() == 1
    select = jax.jit(lambda stacked, layer: stacked[layer], out_shardings=None if one_process else replicated)
    whole = jax.jit(lambda array: array, out_shardings=replicated)

    def gather(param: jax.Array, layer: int | None) -> np.ndarray | None:
        if layer is not None:
            param = select(param, layer)
        elif not one_process:
            param = whole(param)
        if jax.process_index() != 0:
            return None
        return np.asarray(param) if one_process else np.asarray(param.addressable_data(0))

    return gather


def _write_metadata(source: Source, setup: ModelSetup, staging: Path, dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer files."""
    config = setup.model_config
    hf_config = setup.family.hf.config_to_hf(config, source.context_length)
    original, generation = _origin(source)
    eos_ids = list(source.eos_ids) or [_tokenizer_eos(source)]
    hf_config.update(
        bos_token_id=original.get("bos_token_id"),
        eos_token_id=original.get("eos_token_id", eos_ids[0] if len(eos_ids) == 1 else eos_ids),
        torch_dtype=dtype,
        dtype=dtype,
    )
    (staging / files.CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    generation.setdefault("eos_token_id", hf_config["eos_token_id"])
    if hf_config["bos_token_id"] is not None:
        generation.setdefault("bos_token_id", hf_config["bos_token_id"])
    (staging / files.GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer(source, staging, eos_ids[0])


def _origin(source: Source) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.json and generation_config.json of the Hugging Face model the source is, or that
    its run started from (model.init_from) with that model's tokenizer; empty otherwise."""
    if source.hf is not None:
        return source.hf.config, source.hf.generation_config()
    origin = source.model.get("init_from")
    if (
        not origin
        or not files.is_hf_directory(origin)
        or source.tokenizer != str(Path(origin) / files.TOKENIZER)
    ):
        return {}, {}
    generation = Path(origin) / files.GENERATION_CONFIG
    return files.read_json(Path(origin) / files.CONFIG), files.read_json(
        generation
    ) if generation.is_file() else {}


def _tokenizer_eos(source: Source) -> int:
    from jaxlm.data.tokenizers import load_tokenizer

    return load_tokenizer(source_config(source).data).eos_id


def _write_tokenizer(source: Source, staging: Path, eos_id: int) -> None:
    """tokenizer.json (jaxlm's byte tokenizer as an equivalent one), the files transformers reads
    beside it where the source has them, else a tokenizer_config.json naming the EOS token."""
    if source.tokenizer == "byte":
        (staging / files.TOKENIZER).write_text(byte_tokenizer_json())
    else:
        (staging / files.TOKENIZER).write_bytes(storage.read_bytes(source.tokenizer))
        directory = storage.path(source.tokenizer).parent
        for name in files.TOKENIZER_FILES[1:]:
            if (directory / name).exists():
                (staging / name).write_bytes((directory / name).read_bytes())
    if not (staging / "tokenizer_config.json").exists():
        eos_token = Tokenizer.from_file(str(staging / files.TOKENIZER)).id_to_token(eos_id)
        (staging / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos_token}, indent=2) + "\n")


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
