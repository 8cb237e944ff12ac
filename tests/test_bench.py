"""The benchmarks stay runnable: each prints one JSON line with its figures."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY

from jaxlm.model import remat


def run_bench(script: str, *args: str, host_devices: int = 1) -> dict:
    """Run bench/<script> on the tiny test model; the one JSON line it prints, parsed."""
    result = subprocess.run(
        [sys.executable, f"bench/{script}", "configs/tiny.yaml", *TINY, *args],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={host_devices}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_train_throughput_bench_prints_one_json_line():
    figures = run_bench(
        "train_throughput.py",
        "train.log_every=2",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--bare-steps",
        "2",
        host_devices=2,
    )
    assert figures["devices"]["count"] == 2 and figures["steps"] == 4 and len(figures["rounds"]) == 2
    assert figures["bare_steps"] == 2
    for key in (
        "overhead_ratio",
        "loop_overhead_ratio",
        "step_overhead_ratio",
        "train_wall_tokens_per_s",
        "bare_tokens_per_s",
        "mfu",
    ):
        assert figures[key] > 0, key


def test_compile_time_bench_times_each_depth():
    figures = run_bench("compile_time.py", "--layers", "1", "2", "--repeats", "1")
    assert set(figures["layers"]) == {"scan", "unrolled"}
    for per_depth in figures["layers"].values():
        assert set(per_depth) == {"1", "2"}
        assert all(depth["lower_s"] > 0 and depth["compile_s"] > 0 for depth in per_depth.values())
        assert per_depth["2"]["params"] > per_depth["1"]["params"]
    assert figures["compile_ratio"] > 0 and figures["unrolled_compile_ratio"] > 0


def test_memory_bench_shows_fsdp_halving_the_state_per_device():
    figures = run_bench("memory.py", "--devices", "1", "2", host_devices=2)
    one, two = figures["fsdp"]["1"], figures["fsdp"]["2"]
    assert one["state_bytes"] > 0 and one["argument_bytes"] > 0
    assert abs(two["state_ratio"] - 0.5) < 0.01
    assert abs(two["argument_ratio"] - 0.5) < 0.01


def test_reference_step_bench_times_the_reference_and_jaxlm_steps():
    figures = run_bench(
        "reference_step.py", "train.log_every=1", "--steps", "1", "--warmup", "1", "--layer-modes"
    )
    for key in ("reference_tokens_per_s", "jaxlm_tokens_per_s", "ratio", "scan_ratio", "unrolled_ratio"):
        assert figures[key] > 0, key


def test_flops_check_bench_finds_the_counter_within_ten_percent_of_xla():
    figures = run_bench("flops_check.py", "model.scan_layers=true")  # scans, which XLA counts once
    assert figures["model_flops"] > 0 and figures["xla_flops"] > figures["xla_flops_loop_once"]
    assert abs(figures["relative_difference"]) < 0.1
    assert figures["matmul_flops"] == figures["model_flops"]


def test_data_throughput_bench_draws_batches():
    figures = run_bench("data_throughput.py", "--batches", "20", "--warmup", "2")
    assert figures["tokens_per_batch"] == 8 * 32
    assert figures["tokens_per_s"] > 0 and figures["next_ms_median"] > 0


def test_step_sweep_reports_every_variant_even_one_that_fails():
    result = subprocess.run(
        [
            sys.executable, "bench/step_sweep.py", "configs/tiny.yaml", *TINY, "train.log_every=2",
            "--warmup", "1", "--windows", "1",
            "--variant", "full: model.remat=full", "--variant", "broken: model.remat=sometimes",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    full, broken = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert full["variant"] == "full" and full["tokens_per_s"] > 0 and full["mfu"] > 0
    assert full["last_loss"] < full["first_loss"]  # the step trains
    assert broken["variant"] == "broken" and "model.remat" in broken["error"]


def test_attention_check_agrees_with_float32_on_cpu():
    result = subprocess.run(
        [sys.executable, "bench/attention_check.py", "--batch", "2", "--length", "64", "--heads", "4",
         "--kv-heads", "2", "--head-dim", "16", "--iters", "1", "--max-documents", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["implementation"]: row for row in map(json.loads, result.stdout.strip().splitlines())}
    assert rows["xla"]["out_error"] < 1e-2 and max(rows["xla"]["grad_errors"]) < 1e-2
    assert "error" in rows["cudnn_packed_max4"]  # no cuDNN on a CPU: reported, not raised


def test_host_copy_bench_times_each_copy():
    result = subprocess.run(
        [sys.executable, "bench/host_copy.py", "--gib", "1", "--repeats", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["gib"] == 1 and figures["device_get_s"] > 0
    assert len(figures["pinned_host_s"]) in (0, 2)  # 0 where the device has no pinned host memory


def test_cross_entropy_bench_variants_agree():
    result = subprocess.run(
        [sys.executable, "bench/cross_entropy.py", "--batch", "2", "--length", "32", "--embed", "16",
         "--vocab", "64", "--chunk", "8", "--iters", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    whole = figures["whole"]["loss"]
    assert figures["chunked"]["loss"] == pytest.approx(whole, rel=1e-5)
    assert figures["chunked_remat"]["loss"] == pytest.approx(whole, rel=1e-5)
    assert all(figures[name]["ms"] > 0 for name in ("whole", "chunked", "chunked_remat"))


def test_prepare_throughput_bench_times_prepare_and_both_inputs():
    figures = run_bench("prepare_throughput.py", "--batches", "20", "--warmup", "2", "--workers", "1")
    assert figures["tokens"] > 0 and figures["prepare_tokens_per_s"] > 0
    assert figures["input_tokens_per_s_text"] > 0 and figures["input_tokens_per_s_prepared"] > 0


def test_generate_bench_times_prefill_decode_and_recomputing():
    figures = run_bench(
        "generate.py",
        "--batch-sizes",
        "1",
        "2",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "20",
        "--repeats",
        "2",
    )
    for batch in ("1", "2"):
        assert figures["jaxlm"][batch]["prefill_tokens_per_s"] > 0
        assert figures["jaxlm"][batch]["decode_tokens_per_s"] > 0
    assert figures["recompute"]["context"] == 28 and figures["recompute"]["tokens_per_s"] > 0
    assert figures["cache_speedup"] > 0
    hf_io = figures["hf_io"]
    assert hf_io["import_s"] > 0 and hf_io["export_s"] > 0
    assert hf_io["parameter_bytes"] > 0 and "transformers_load_s" in hf_io


def test_remat_bench_orders_the_policies_by_memory_and_recomputation():
    """Layers scanned: unrolled, XLA:CPU's compiled peak hardly moves with the policy
    (docs/performance.md)."""
    result = subprocess.run(
        [sys.executable, "bench/remat.py", "configs/tiny.yaml", *TINY, "model.scan_layers=true",
         "--policies", "none,save_dot_except_mlp,full", "--steps", "2", "--warmup", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["policy"]: row for row in map(json.loads, result.stdout.strip().splitlines())}
    none, attention, full = rows["none"], rows["save_dot_except_mlp"], rows["full"]
    layer_input = 8 * 32 * 64 * 4  # rows × length × d_model × float32: all that full keeps
    assert full["saved_bytes_per_layer"] == layer_input and full["saved_by_name"] == {}
    assert none["saved_bytes_per_layer"] > attention["saved_bytes_per_layer"] > layer_input
    assert set(attention["saved_by_name"]) == set(remat.ATTENTION)
    assert none["flops_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert full["flops_ratio"] > attention["flops_ratio"] > 1
    assert none["peak_bytes"] > full["peak_bytes"] and none["temp_bytes"] > full["temp_bytes"]
    assert all(row["step_time_s"] > 0 for row in rows.values())
    # The same gradients under every policy: the same loss at step 2, after one update.
    assert full["last_loss"] == pytest.approx(none["last_loss"], rel=1e-5)


def test_moe_bench_times_each_path_and_the_dispatch_share():
    result = subprocess.run(
        [sys.executable, "bench/moe.py", "--tokens", "256", "--d-model", "32", "--expert-dim", "64",
         "--experts", "4", "--capacity-factor", "1.0", "--steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = {line["path"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert list(lines) == ["experts_only", "ragged_dot", "capacity", "dense"]
    assert all(line["fwd_bwd_s"] > 0 and line["temp_bytes"] > 0 for line in lines.values())
    assert 0 <= lines["ragged_dot"]["dispatch_share"] < 1 and 0 <= lines["capacity"]["dropped"] < 1
