"""`jaxlm train` end to end in a subprocess, and bad input as one line with a non-zero exit."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY, read_metrics


def jaxlm(*args: str, devices: int = 8) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_cli_trains_the_tiny_config_on_the_built_in_corpus(tmp_path):
    result = jaxlm(
        "train", "configs/tiny.yaml", "train.steps=6", "train.log_every=3", "train.eval_every=6",
        "checkpoint.every=3", "mesh.fsdp=4", "mesh.data=2", f"run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "step 6/6" in result.stderr and "eval_loss" in result.stderr
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [3, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.path=/nonexistent/corpus"], "data.path=/nonexistent/corpus does not exist"),
        (["mesh.fsdp=3"], "mesh data=1 fsdp=3 tensor=1 uses 3 devices but there are 8"),
        (["train.global_batch_size=12", "mesh.fsdp=8"], "not divisible by the 8 data-parallel devices"),
        (["model.num_layer=2"], "model.num_layer is not a config key; did you mean model.num_layers?"),
        (["optim.lr=1e30", "optim.clip_norm=0", "train.steps=6"], "loss is nan at step"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, args, expected):
    result = jaxlm("train", "configs/tiny.yaml", *TINY, "train.log_every=2", f"run.dir={tmp_path}", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr


def test_empty_corpus_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    result = jaxlm("train", "configs/tiny.yaml", f"data.path={corpus}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "the corpus is empty" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cpu_device_count_covers_dcn_slices():
    from jaxlm.cli import cpu_devices_for_mesh
    from jaxlm.config import load_config

    assert cpu_devices_for_mesh(load_config(None, ["mesh.fsdp=4", "mesh.data=2"]).mesh) == 8
    assert cpu_devices_for_mesh(load_config(None, ["mesh.fsdp=4", "mesh.dcn_data=2"]).mesh) == 8
    assert cpu_devices_for_mesh(load_config(None, ["mesh.fsdp=-1", "mesh.tensor=2"]).mesh) == 2
