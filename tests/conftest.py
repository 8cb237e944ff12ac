"""Shared test set-up: 8 simulated CPU devices, a tiny model, and helpers to run training."""

import os

# Must be set before JAX starts its CPU backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
from pathlib import Path

import pytest

from jaxlm.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent

# Small enough to compile in a couple of seconds on 2 cores; big enough to shard 8 ways.
TINY = [
    "model.vocab_size=264",
    "model.d_model=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.mlp_dim=128",
    "data.seq_len=32",
    "train.global_batch_size=8",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=0",
    "optim.warmup_steps=2",
]


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"run.dir={run_dir}", *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir) if "loss" in record}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small real-text corpus: .txt documents and a .jsonl file, made from stdlib sources."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("textwrap.py", "bisect.py", "glob.py", "fnmatch.py", "shlex.py"):
        (root / f"{name}.txt").write_text((stdlib / name).read_text())
    with (root / "docs.jsonl").open("w") as jsonl:
        for name in ("colorsys.py", "keyword.py", "this.py"):
            jsonl.write(json.dumps({"text": (stdlib / name).read_text(), "id": name}) + "\n")
    return root
