"""Hugging Face import and export times for the model of a config.

Writes the config's model, random weights in the layout transformers saves (safetensors, one
file per --shard-mb), as a Hugging Face directory in a temporary directory, then times:

- import_s: `jaxlm.load` of that directory onto the config's mesh, until every parameter is on
  its devices (safetensors read slice by slice into the shardings);
- export_s: `jaxlm export-hf`'s `export` of it to a new directory (read, gathered to the host one
  tensor at a time, written, renamed), the same bytes out as in;
- transformers_load_s: `AutoModelForCausalLM.from_pretrained` of the same directory, where
  transformers and torch are installed (null otherwise).

Each figure is the median of --repeats rounds. Prints one JSON line to stdout; logs go to stderr.

    python bench/hf_io.py configs/small_20m.yaml
    python bench/hf_io.py configs/small_20m.yaml model.param_dtype=bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from report import report  # bench/report.py: `python bench/<script>.py` puts bench/ on sys.path
from safetensors.numpy import save_file

from jaxlm.config import Config, load_config
from jaxlm.hf import files
from jaxlm.hf.write import byte_tokenizer_json
from jaxlm.inference.export import export
from jaxlm.inference.loading import load
from jaxlm.model import registry


def write_random_hf_directory(config: Config, directory: Path, shard_bytes: int) -> int:
    """The config's model with random weights as a Hugging Face directory; returns its bytes."""
    model = config.model
    hf = registry.family_of(model).hf
    dtype = np.dtype("float32") if model.param_dtype == "float32" else np.dtype(jax.numpy.bfloat16)
    rng = np.random.default_rng(0)
    shards, weight_map, total = [{}], {}, 0
    for tensor in hf.tensors(model):
        for _, name in tensor.names(model.num_layers):
            value = (0.02 * rng.standard_normal(tensor.hf_shape, np.float32)).astype(dtype)
            if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + value.nbytes > shard_bytes:
                shards.append({})
            shards[-1][name] = value
            total += value.nbytes
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file_name)
    hf_config = hf.config_to_hf(model, model.context_length or config.data.seq_len)
    hf_config.update(eos_token_id=256, torch_dtype=model.param_dtype)
    (directory / files.CONFIG).write_text(json.dumps(hf_config))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / files.INDEX).write_text(json.dumps(index))
    (directory / files.TOKENIZER).write_text(byte_tokenizer_json())
    return total


def time_import(directory: Path, overrides: list[str]) -> float:
    started = time.perf_counter()
    loaded = load(directory, overrides=overrides)
    jax.block_until_ready(loaded.params)
    return time.perf_counter() - started


def time_export(directory: Path, scratch: Path) -> float:
    out = scratch / "exported"
    started = time.perf_counter()
    export(directory, out)
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return elapsed


def time_transformers(directory: Path) -> float | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(directory)
    return time.perf_counter() - started


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config, args.overrides)
    how_to_run = [o for o in args.overrides if o.startswith(("mesh.", "model.param_dtype", "model.dtype"))]
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "hf"
        directory.mkdir()
        total = write_random_hf_directory(config, directory, args.shard_mb * 2**20)
        rounds = [
            (
                time_import(directory, how_to_run),
                time_export(directory, Path(scratch)),
                time_transformers(directory),
            )
            for _ in range(args.repeats)
        ]
    imports, exports, theirs = zip(*rounds, strict=True)
    import_s, export_s = statistics.median(imports), statistics.median(exports)
    return {
        "config": args.config,
        "param_dtype": config.model.param_dtype,
        "parameter_bytes": total,
        "devices": jax.device_count(),
        "import_s": round(import_s, 3),
        "import_mb_per_s": round(total / 2**20 / import_s, 1),
        "export_s": round(export_s, 3),
        "export_mb_per_s": round(total / 2**20 / export_s, 1),
        "transformers_load_s": None if theirs[0] is None else round(statistics.median(theirs), 3),
        "repeats": args.repeats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=64, help="size of each safetensors file written")
    args = parser.parse_args()
    return report(lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
