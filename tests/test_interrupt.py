"""Ctrl-C (SIGINT) on one process of a run of several stops all of them: once, with a checkpoint
at a step they agree on; twice, at once. Real processes on 127.0.0.1, as in test_multihost.py."""

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY, tiny_config
from test_multihost import SHARED, free_port, logged_steps, start, wait_for

from jaxlm.training.train import train

pytestmark = pytest.mark.multiprocess

HEARTBEAT_S = 15
FIRST_SIGINT_LINE = (
    "jaxlm[p1] SIGINT: stopping all 2 processes at the next step they agree on, after saving a checkpoint; "
    "Ctrl-C again to stop this one at once"
)


def start_two(run_dir: Path) -> tuple[list, list[Path]]:
    args = [
        *SHARED,
        "train.steps=100000",
        "checkpoint.every=0",
        f"run.dir={run_dir}",
        f"distributed.heartbeat_timeout_s={HEARTBEAT_S}",
    ]
    port = free_port()
    logs = [run_dir / f"p{i}.log" for i in range(2)]
    return [start(i, 2, port, args, logs[i]) for i in range(2)], logs


def wait_all(processes, timeout: float) -> list[int | None]:
    """Exit codes, None for a process still running after `timeout` seconds (then killed)."""
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for process in processes:
        process.kill()
    return codes


def saved_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def stop_steps(logs: list[Path]) -> list[int]:
    return [int(re.search(r"preempted: stopping at step (\d+)", log.read_text()).group(1)) for log in logs]


def test_ctrl_c_on_one_process_saves_at_an_agreed_step_and_stops_all_within_the_heartbeat_timeout(tmp_path):
    processes, logs = start_two(tmp_path)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 3, 180, "three logged steps")
        processes[1].send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        # Without the fix process 0 waits in a collective for minutes: wait no longer than needed.
        codes = wait_all(processes, HEARTBEAT_S + 30)
        seconds = time.monotonic() - interrupted
    finally:
        for p in processes:
            p.kill()
    assert codes == [75, 75], [log.read_text()[-2000:] for log in logs]  # preempted: resumable
    assert seconds < HEARTBEAT_S
    assert FIRST_SIGINT_LINE in logs[1].read_text()
    stops = stop_steps(logs)
    assert stops[0] == stops[1] >= 3
    assert saved_steps(tmp_path) == [stops[0]]


def test_ctrl_c_while_a_resumed_run_starts_up_still_stops_all_at_an_agreed_step(tmp_path):
    train(tiny_config(tmp_path, *SHARED[len(TINY) :], "train.steps=2", "checkpoint.every=2"))
    processes, logs = start_two(tmp_path)
    try:
        wait_for(lambda: "resuming from checkpoint step 2" in logs[1].read_text(), 180, "the restore")
        processes[1].send_signal(signal.SIGINT)  # before the train step has compiled
        codes = wait_all(processes, 120)  # restore and compilation come first, at this machine's pace
    finally:
        for p in processes:
            p.kill()
    assert codes == [75, 75], [log.read_text()[-2000:] for log in logs]
    log = logs[1].read_text()
    assert log.index(FIRST_SIGINT_LINE) < log.index("compiled the train step")
    stops = stop_steps(logs)
    assert stops[0] == stops[1] > 2
    assert saved_steps(tmp_path) == [2, stops[0]]


def test_a_second_ctrl_c_kills_that_process_at_once_and_the_others_stop_within_the_heartbeat_timeout(
    tmp_path,
):
    processes, logs = start_two(tmp_path)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 3, 180, "three logged steps")
        processes[1].send_signal(signal.SIGINT)
        wait_for(lambda: FIRST_SIGINT_LINE in logs[1].read_text(), 30, "the first SIGINT's line")
        processes[1].send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        codes = wait_all(processes[1:], 5)
        seconds = time.monotonic() - interrupted
        codes = wait_all(processes[:1], HEARTBEAT_S + 30) + codes
        others_seconds = time.monotonic() - interrupted
    finally:
        for p in processes:
            p.kill()
    assert codes[1] == -signal.SIGINT and seconds < 2, logs[1].read_text()[-2000:]  # a shell says 130
    assert codes[0] not in (None, 0, 75), logs[0].read_text()[-2000:]
    # The coordination service's word, or, when a collective failed first as process 1 went away,
    # jaxlm's line naming this host and the likely cause; or, on these CPU devices only, Gloo's
    # abort when the dying peer's half-sent message arrives first (a C++ terminate, before any
    # Python sees it; TPU and GPU collectives are not Gloo's).
    stopped_by = (
        "another task died",
        "stopped sending heartbeats",
        "if another process of the run stopped or died",
        "gloo::EnforceNotMet",
    )
    assert any(reason in logs[0].read_text() for reason in stopped_by), logs[0].read_text()[-2000:]
    assert others_seconds < HEARTBEAT_S + 10
