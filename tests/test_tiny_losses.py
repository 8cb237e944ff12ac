"""The README's main command logs the losses recorded in tests/fixtures/tiny_losses.json: a change
meant to leave every number alone (a refactoring, the model-family redesign) leaves them, to
1e-5. A change meant to move them (the data order, say) records them again and says so.

XLA compiles for the CPU's vector units, and 300 steps carry the rounding of AVX2 and AVX-512
code apart by up to 1e-4: the fixture holds a recording per set of vector flags (`by_cpu`), and
its top level is the one recorded first (the CI machine of 2026-12-01)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import REPO, read_metrics

from jaxlm.data.sources import stdlib_documents

RECORDED = json.loads((REPO / "tests/fixtures/tiny_losses.json").read_text())


def cpu_vector_flags() -> str:
    """This CPU's SIMD flags (avx*, fma, sse4*, amx*) as /proc/cpuinfo lists them, sorted."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return " ".join(sorted(flag for flag in flags if flag.startswith(("avx", "fma", "sse4", "amx"))))


FIXTURE = RECORDED.get("by_cpu", {}).get(cpu_vector_flags(), RECORDED)


def corpus_fingerprint() -> str:
    """The built-in corpus (this Python's standard library) by names and sizes."""
    digest = hashlib.sha256()
    for ref in stdlib_documents():
        digest.update(f"{ref.name}\0{os.path.getsize(ref.path)}\n".encode())
    return digest.hexdigest()


def test_the_tiny_config_logs_the_recorded_losses(tmp_path):
    recorded = FIXTURE["recorded_with"]
    if corpus_fingerprint() != recorded["corpus"]["sha256_of_names_and_sizes"]:
        pytest.skip(f"the built-in corpus is this Python's standard library, not {recorded['python']}'s")
    if jax.__version__ != recorded["jax"]:
        pytest.skip(f"recorded with jax {recorded['jax']}; XLA's float32 results differ between releases")
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "train", "configs/tiny.yaml", f"run.dir={tmp_path}"],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(tmp_path)
    losses = {str(r["step"]): r["loss"] for r in records if "loss" in r}
    assert losses.keys() == FIXTURE["losses"].keys()
    for step, loss in FIXTURE["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    evals = {str(r["step"]): r for r in records if "eval_loss" in r}
    assert evals.keys() == FIXTURE["eval_loss"].keys()
    for step, loss in FIXTURE["eval_loss"].items():
        assert evals[step]["eval_loss"] == pytest.approx(loss, rel=1e-5)
        assert evals[step]["eval_bits_per_byte"] == pytest.approx(
            FIXTURE["eval_bits_per_byte"][step], rel=1e-5
        )
