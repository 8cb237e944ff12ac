"""A trained model out to the formats other tools load: `export` writes a jaxlm run's (or a Hugging
Face directory's) model as a Hugging Face directory that transformers and vLLM load as they are
(config.json, sharded safetensors with their index, generation_config.json, tokenizer files);
`export_adapter` writes a run's LoRA adapters in PEFT's format. The directory is written beside
OUT_DIR and renamed into place when complete, so OUT_DIR never holds half an export."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from jaxlm import storage
from jaxlm.errors import UserError
from jaxlm.hf import files, peft, write
from jaxlm.hf.write import gatherer
from jaxlm.inference.loading import Source, open_source, source_config
from jaxlm.model.lora import adapter_path, lookup
from jaxlm.training.setup import ModelSetup, build_model

log = logging.getLogger("jaxlm")


def export(
    source_path: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    devices=None,
    max_shard_bytes: int = write.MAX_SHARD_BYTES,
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
        staging = Path(tempfile.mkdtemp(prefix="jaxlm-export-")) if bucket else write.staging_directory(out)
    try:
        write.write_tensors(
            params,
            setup.family.hf.tensors(config.model),
            config.model.num_layers,
            setup.mesh,
            staging,
            jnp.dtype(dtype),
            max_shard_bytes,
        )
        if writing:
            _write_metadata(source, setup, staging, dtype)
            if bucket:
                write.upload(staging, out)
            else:
                os.replace(staging, out)  # over an empty OUT_DIR too
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging)
    multihost_utils.sync_global_devices("jaxlm export-hf done")
    at_step = "" if source.step is None else f" (step {source.step})"
    log.info("exported %s%s to %s, %s tensors", source_path, at_step, out, dtype)


def export_adapter(
    source_path: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    devices=None,
) -> None:
    """Write the LoRA adapters of the jaxlm run at `source_path` to `out_dir` in PEFT's format."""
    out = Path(out_dir)
    if str(out_dir).startswith("gs://") or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UserError(
            f"{out} must be a new (or empty) local directory; choose another OUT_DIR (nothing was written)"
        )
    source = open_source(source_path, step)
    if source.hf is not None:
        raise UserError(f"{source_path} is a Hugging Face model, not a jaxlm run that trained LoRA adapters")
    config = source_config(source)
    setup = build_model(config, devices)
    params, adapters = source.read_adapters(setup)
    spec = adapters.lora
    targets = peft.lora_targets(setup, spec)  # checked before anything is written
    dtype = np.dtype(dtype or config.model.param_dtype)
    gather = gatherer(adapters.mesh)
    tensors: dict[str, np.ndarray] = {}
    for projection, tensor, _ in targets:
        factors = lookup(params, adapter_path(projection))
        for layer in range(setup.model_config.num_layers) if projection.stacked else [None]:
            a, b = gather(factors["a"], layer), gather(factors["b"], layer)
            if a is None:
                continue  # not process 0
            module = peft.PREFIX + peft.module_name(tensor).format(layer=layer)
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(
                a.reshape(-1, spec.rank).T.astype(dtype)
            )
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(
                b.reshape(spec.rank, -1).T.astype(dtype)
            )
    if jax.process_index() != 0:
        return
    staging = write.staging_directory(out)
    try:
        save_file(tensors, staging / peft.WEIGHTS, metadata={"format": "pt"})
        adapter_config = peft.peft_config(setup, spec, targets, source.model.get("init_from"))
        (staging / peft.CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info(
        "exported the LoRA adapters of %s to %s (PEFT format, %d tensors)", source_path, out, len(tensors)
    )


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
        (staging / files.TOKENIZER).write_text(write.byte_tokenizer_json())
    else:
        (staging / files.TOKENIZER).write_bytes(storage.read_bytes(source.tokenizer))
        directory = storage.path(source.tokenizer).parent
        for name in files.TOKENIZER_FILES[1:]:
            if (directory / name).exists():
                (staging / name).write_bytes((directory / name).read_bytes())
    if not (staging / "tokenizer_config.json").exists():
        eos_token = Tokenizer.from_file(str(staging / files.TOKENIZER)).id_to_token(eos_id)
        (staging / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos_token}, indent=2) + "\n")
