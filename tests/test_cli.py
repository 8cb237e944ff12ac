"""`jaxlm train` end to end in a subprocess: bad input as one line with a non-zero exit, the CPU
devices a mesh asks for, Ctrl-C; and the cluster detection that decides between one process and
several."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY, read_metrics

from jaxlm import distributed


def cli_env(devices: int | None = 8) -> dict[str, str]:
    """This environment on CPU, with `devices` host devices forced (None: the CLI picks them)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def jaxlm(*args: str, devices: int | None = 8) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(devices),
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
        (["mesh.fsdp=3"], "mesh data=1 fsdp=3 expert=1 context=1 tensor=1 uses 3 devices but there are 8"),
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


def test_a_single_process_gets_the_cpu_devices_its_mesh_asks_for(tmp_path):
    result = jaxlm(
        "train", "configs/tiny.yaml", *TINY, "train.steps=1", "mesh.fsdp=4", "mesh.data=2", f"run.dir={tmp_path}",
        devices=None,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "jaxlm[p0] model:" in result.stderr and "over 8 devices (cpu)" in result.stderr


def test_ctrl_c_stops_a_single_process_at_once_with_status_130(tmp_path):
    log = tmp_path / "stderr.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", "configs/tiny.yaml", *TINY, "train.steps=100000",
         f"run.dir={tmp_path}"],
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "step 2/100000" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        code = process.wait(timeout=30)
        seconds = time.monotonic() - interrupted
    finally:
        process.kill()
    assert code == 130, log.read_text()[-2000:]
    assert seconds < 10
    assert log.read_text().rstrip().endswith("jaxlm: interrupted") and "Traceback" not in log.read_text()


# JAX has no public question "which cluster, of how many processes, is this?" before
# jax.distributed.initialize(), so distributed.detected_cluster asks JAX's private registry of
# cluster environments: these fail if JAX changes it.
SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def test_a_slurm_job_step_of_several_tasks_is_a_cluster(monkeypatch):
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri", raising=False)  # Open MPI comes first in JAX's order
    for name, value in {**SLURM_TASK, "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == "slurm"


def test_a_single_slurm_task_is_a_single_process_that_keeps_every_gpu(monkeypatch):
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri", raising=False)
    for name, value in {**SLURM_TASK, "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(name, value)
    # jax.distributed.initialize() would take this for a cluster of one and show it only GPU 0.
    assert distributed.detected_cluster() is None
