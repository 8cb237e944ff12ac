"""The benchmarks stay runnable: each prints one JSON line with its figures."""

import json
import os
import subprocess
import sys

from conftest import REPO, TINY


def test_train_throughput_bench_prints_one_json_line():
    result = subprocess.run(
        [
            sys.executable,
            "bench/train_throughput.py",
            "configs/tiny.yaml",
            *TINY,
            "train.log_every=2",
            "--steps",
            "4",
        ],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["devices"]["count"] == 2 and figures["steps"] == 4
    for key in ("train_tokens_per_s", "bare_tokens_per_s", "overhead_ratio", "train_step_time_s", "mfu"):
        assert figures[key] > 0, key
