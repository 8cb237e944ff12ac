"""Several real processes on 127.0.0.1 (jax.distributed over CPU devices): the same losses as one
process, exact resume, SIGTERM preemption, a killed process, resume on another process count and
mesh, and the SLURM path through JAX's auto-detection."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, read_metrics, tiny_config, train_losses

from jaxlm.training.train import train

pytestmark = pytest.mark.multiprocess

# 2 processes × 4 CPU devices, and the same global mesh and schedule on 1 × 8; the batch order
# is the same by default.
SHARED = [*TINY, "mesh.fsdp=4", "mesh.data=2", "optim.schedule_steps=8"]


def free_port(low: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (any, or the first free one from `low` up)."""
    for port in [0] if low == 0 else range(low, 65536):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free port from {low}")


def start(
    process_id: int, num_processes: int, port: int, args: list[str], log: Path, env=None
) -> subprocess.Popen:
    """One jaxlm process, as launch/local.sh starts it."""
    environment = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    distributed = [
        f"distributed.coordinator_address=127.0.0.1:{port}",
        f"distributed.num_processes={num_processes}",
        f"distributed.process_id={process_id}",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", "configs/tiny.yaml", *args, *distributed],
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )


def run_processes(command: list[str], devices: int = 2, env=None) -> list[tuple[str, str]]:
    """Two processes of `jaxlm COMMAND ... distributed.*`, `devices` CPU devices each, run to the
    end: each one's (stdout, stderr); both must exit 0."""
    port = free_port()
    environment = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    distributed = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxlm.cli", *command, *distributed, f"distributed.process_id={index}"],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "".join(err for _, err in outputs)
    return outputs


def local_sh(run_dir: Path, *args: str, shared: list[str] = SHARED) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "JAXLM": f"{sys.executable} -m jaxlm.cli",
        "PYTHON": sys.executable,
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.run(
        ["bash", "launch/local.sh", "2", "configs/tiny.yaml", *shared, f"run.dir={run_dir}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len([r for r in read_metrics(run_dir) if "loss" in r]) if path.exists() else 0


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-process")
    train(tiny_config(run_dir, *SHARED[len(TINY) :], "train.steps=8"))
    return train_losses(run_dir)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two-processes")
    result = local_sh(run_dir, "train.steps=8", "checkpoint.every=4")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_two_processes_log_the_losses_of_one(two_process_run, one_process_reference):
    run_dir, result = two_process_run
    assert "jaxlm[p1]" in result.stderr and "process 1 of 2, 4 local / 8 global devices" in result.stderr
    losses = train_losses(run_dir)
    assert losses.keys() == one_process_reference.keys()
    for step, loss in losses.items():
        assert abs(loss - one_process_reference[step]) / one_process_reference[step] < 1e-4
    # Tokens seen are summed over both processes' rows: 8 steps of 8 rows of 32 tokens.
    assert [r["tokens_seen"] for r in read_metrics(run_dir) if "loss" in r][-1] == 8 * 8 * 32
    # Each process writes the position of its rows' streams (rows 0-3 and 4-7 of 8).
    data_files = sorted(p.name for p in (run_dir / "checkpoints" / "8" / "data").glob("streams_*"))
    assert data_files == ["streams_0-3-of-8.json", "streams_4-7-of-8.json"]


def test_multiprocess_resume_matches_the_uninterrupted_run(tmp_path, two_process_run):
    first = local_sh(tmp_path, "train.steps=4", "checkpoint.every=4")
    assert first.returncode == 0, first.stderr
    second = local_sh(tmp_path, "train.steps=8", "checkpoint.every=4")
    assert second.returncode == 0, second.stderr
    assert "resuming from checkpoint step 4" in second.stderr
    expected, resumed = train_losses(two_process_run[0]), train_losses(tmp_path)
    for step in range(1, 9):
        assert abs(resumed[step] - expected[step]) <= 1e-6


def test_two_processes_sharing_an_expert_axis_log_the_losses_of_one(tmp_path):
    """A Mixtral whose 8 experts split over both processes' devices (mesh.expert=8): the
    all-to-all crosses processes."""
    moe = [*TINY, "model.family=mixtral", "model.num_experts=8", "mesh.expert=8", "mesh.fsdp=1"]
    train(tiny_config(tmp_path / "one", *moe[len(TINY) :]))
    result = local_sh(tmp_path / "two", shared=moe)
    assert result.returncode == 0, result.stderr
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step, loss in two.items():
        assert abs(loss - one[step]) / one[step] < 1e-5


# One process of two loading a Hugging Face mixture of experts onto mesh.expert=8: it prints which
# experts' tensors of w_gate it read (each safetensors slice wrapped to note its reads).
READ_EXPERTS = """
import json
import sys
import jax
from jaxlm.hf import read

process, port, fixture = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
experts_read = set()


class Noted:
    def __init__(self, number, tensor, inner):
        self.number, self.tensor, self.inner = number, tensor, inner

    def __getitem__(self, index):
        if self.tensor.param == "blocks.mlp.w_gate":
            experts_read.add(self.number % self.tensor.experts)
        return self.inner[index]


original = read._sharded_array
read._sharded_array = lambda tensor, slices, *rest: original(
    tensor, [Noted(i, tensor, s) for i, s in enumerate(slices)], *rest
)
import jaxlm

jaxlm.load(fixture, overrides=["mesh.expert=8", "mesh.fsdp=1"])
print("experts read:", json.dumps(sorted(experts_read)))
"""


def test_each_process_reads_only_the_experts_it_holds(tmp_path):
    script = tmp_path / "read_experts.py"
    script.write_text(READ_EXPERTS)
    port = free_port()
    environment = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    fixture = REPO / "tests/fixtures/hf/qwen3_moe"  # 8 experts
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(index), str(port), str(fixture)],
            cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "".join(err for _, err in outputs)
    read = [json.loads(out.split("experts read:")[1]) for out, _ in outputs]
    assert sorted(read[0] + read[1]) == list(range(8)) and len(read[0]) == len(read[1]) == 4


def test_sigterm_to_one_process_saves_at_an_agreed_step_and_all_exit_as_preempted(
    tmp_path, one_process_reference
):
    port, grace = free_port(), 20
    args = [
        *SHARED,
        "train.steps=100000",
        "checkpoint.every=0",
        f"run.dir={tmp_path}",
        f"distributed.preemption_grace_s={grace}",
    ]
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    processes = [start(i, 2, port, args, logs[i]) for i in range(2)]
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 3, 180, "three logged steps")
        processes[1].send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        codes = [p.wait(timeout=grace + 30) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert codes == [75, 75], [log.read_text()[-2000:] for log in logs]  # not finished: resume
    assert time.monotonic() - signalled < grace + 30
    stops = [int(re.search(r"preempted: stopping at step (\d+)", log.read_text()).group(1)) for log in logs]
    assert stops[0] == stops[1]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [stops[0]]

    # Resume on 1 process × 8 devices with another mesh (fsdp 4 × tensor 2): parameters, optimizer
    # state and the data position all carry over.
    stop = stops[0]
    resumed = tiny_config(
        tmp_path, *SHARED[len(TINY) :], f"train.steps={stop + 2}", "mesh.data=1", "mesh.tensor=2"
    )
    train(resumed)
    reference_dir = tmp_path / "reference"
    train(tiny_config(reference_dir, *SHARED[len(TINY) :], f"train.steps={stop + 2}"))
    reference, after = train_losses(reference_dir), train_losses(tmp_path)
    for step in (stop + 1, stop + 2):
        assert abs(after[step] - reference[step]) / reference[step] < 1e-4


def test_a_killed_process_stops_the_others_and_the_run_resumes_from_the_last_checkpoint(tmp_path):
    port = free_port()
    args = [
        *SHARED,
        "train.steps=100000",
        "checkpoint.every=2",
        f"run.dir={tmp_path}",
        "distributed.heartbeat_timeout_s=5",
    ]
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    processes = [start(i, 2, port, args, logs[i]) for i in range(2)]
    try:
        wait_for(lambda: (tmp_path / "checkpoints" / "4").is_dir(), 180, "checkpoint step 4")
        processes[1].kill()
        killed = time.monotonic()
        code = processes[0].wait(timeout=90)
    finally:
        for p in processes:
            p.kill()
    assert code != 0
    assert time.monotonic() - killed < 60
    # How the survivor learns of it depends on when the kill lands: jax.distributed's error
    # (a peer gone, heartbeats missed) between steps, or, in the middle of a collective, gloo
    # aborting on the half-sent message its dead peer left on the socket.
    told = ("another task died", "stopped sending heartbeats", "Received data size doesn't match")
    assert any(reason in logs[0].read_text() for reason in told), logs[0].read_text()[-2000:]
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    result = train(
        tiny_config(tmp_path, *SHARED[len(TINY) :], f"train.steps={saved + 1}", "checkpoint.every=2")
    )
    assert result.step == saved + 1


def test_slurm_script_runs_through_jax_auto_detection(tmp_path, one_process_reference):
    """launch/slurm.sbatch under a stand-in `srun` that starts the tasks on this machine with the
    variables real srun sets; JAX's SLURM detection finds coordinator, count and ids itself."""
    port = free_port(low=61440)  # JAX derives the port from the job id: 61440 + job_id % 4096
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "# Stand-in for srun: SLURM_NTASKS local tasks with the variables srun gives each task.\n"
        "[[ $1 == --* ]] && shift\n"
        "pids=()\n"
        "for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
        '  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" 2> "$LOG_DIR/task$i.log" &\n'
        "  pids+=($!)\n"
        "done\n"
        "status=0\n"
        'for pid in "${pids[@]}"; do wait "$pid" || status=1; done\n'
        "exit $status\n"
    )
    (bin_dir / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": str(port - 61440),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_GPUS_ON_NODE": "0",
        "LOG_DIR": str(tmp_path),
        "JAXLM": f"{sys.executable} -m jaxlm.cli",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [
            "bash",
            "launch/slurm.sbatch",
            "configs/tiny.yaml",
            *SHARED,
            "mesh.data=1",
            "mesh.dcn_data=2",  # each process stands for one slice: data parallelism over "DCN"
            "train.steps=2",
            f"run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = [(tmp_path / f"task{i}.log").read_text() for i in range(2)]
    assert result.returncode == 0, logs
    for i, log in enumerate(logs):
        assert f"jax.distributed up from slurm auto-detection: process {i} of 2" in log
    losses = train_losses(tmp_path / "run")
    assert list(losses) == [1, 2]
    for step, loss in losses.items():
        assert abs(loss - one_process_reference[step]) / one_process_reference[step] < 1e-4
