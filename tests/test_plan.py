"""`jaxlm plan`: the real train step compiled for a TPU topology on this CPU host (libtpu's
compiler, compile-only devices), its memory verdict, its figures and the sweep."""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY, tiny_config

from jaxlm.data import pipeline
from jaxlm.devices import CHIPS
from jaxlm.errors import ConfigError
from jaxlm.planning import plan
from jaxlm.planning import sweep as plan_sweep
from jaxlm.training.metrics import matmul_flops
from jaxlm.training.setup import jit_train_step

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu comes with pip install -e ".[test]"'
)
# Far beyond a v5e's 16 GiB: a 262,144 × 8192 embedding table and its output layer (4.3B
# parameters) in one layer, which compiles quickly.
TOO_LARGE = ["model.vocab_size=262144", "model.d_model=8192", "model.num_heads=64", "model.num_layers=1"]


def jaxlm_plan(*args: str, python_prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys; {python_prelude}from jaxlm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "plan", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=REPO,
        timeout=300,
    )


@needs_libtpu
def test_a_tiny_model_compiles_for_a_v5e_2x2_and_fits(tmp_path):
    config = tiny_config(tmp_path)
    result = plan.plan(config, "v5e:2x2")
    assert result.fits and result.refusal is None
    assert result.chips == 4 and result.chip.name == "TPU v5e"
    assert result.mesh == {"data": 1, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    assert result.argument_bytes > 0 and result.peak_bytes < result.hbm_bytes
    assert result.param_bytes * result.chips == result.param_count * 4  # float32, sharded 4 ways
    speed = result.speed
    # Without remat the matmuls counted in the compiled step are exactly the model FLOPs.
    assert speed.flops * result.chips == pytest.approx(speed.model_flops, rel=1e-9)
    assert result.flops_ratio == pytest.approx(1.0, rel=1e-9) and result.micro_batches == 1
    assert result.host_bytes == 0 and speed.host_s == 0
    assert speed.step_s == max(speed.compute_s, speed.memory_s, speed.collective_s) > 0
    assert 0 < speed.mfu <= 1 and speed.tokens_per_s > 0
    report = plan.format_plan(result).splitlines()
    assert report[0].endswith("; remat none; 1 micro-batch") and report[-1] == plan.verdict(result)
    (peak,) = [line for line in report if line.lstrip().startswith("peak ")]
    assert peak.endswith("; 1.00× the model FLOPs")
    assert not [line for line in report if "host" in line.split("(")[0]]  # no host memory, no host link
    assert plan.verdict(result).startswith("fits: ")


@needs_libtpu
def test_full_remat_counts_the_recomputed_forward_pass(tmp_path):
    none = plan.plan(tiny_config(tmp_path), "v5e:2x2")
    full = plan.plan(tiny_config(tmp_path, "model.remat=full"), "v5e:2x2")
    assert 1.1 < full.speed.flops / none.speed.flops < 4 / 3 + 1e-9


@needs_libtpu
def test_offloaded_activations_are_reported_in_host_memory_and_cost_host_link_time(tmp_path):
    kept = plan.plan(tiny_config(tmp_path, "model.remat=save_dot_except_mlpwi"), "v5e:2x2")
    offloaded = plan.plan(tiny_config(tmp_path, "model.remat=offload_dot_except_mlpwi"), "v5e:2x2")
    assert kept.host_bytes == 0 and offloaded.host_temp_bytes > 0 and offloaded.host_argument_bytes == 0
    # The compiler's own peak counts host buffers too; the HBM's is bounded by what it holds.
    device = offloaded.argument_bytes + offloaded.temp_bytes + offloaded.output_bytes
    assert 0 < offloaded.peak_bytes <= device and offloaded.fits
    assert offloaded.flops_ratio == pytest.approx(kept.flops_ratio, rel=1e-9)  # the same recomputation
    assert kept.flops_ratio > 1.05
    speed = offloaded.speed
    assert speed.host_bytes == 2 * offloaded.host_temp_bytes  # out in the forward pass, back in the backward
    assert speed.host_s == pytest.approx(speed.host_bytes / offloaded.chip.host_link_bandwidth)
    assert speed.step_s >= speed.host_s > 0
    report = plan.format_plan(offloaded)
    assert "host: temporaries" in report and "host transfers" in report
    assert "at most arguments + temporaries" in report
    assert "host transfers" not in plan.format_plan(kept)


@needs_libtpu
def test_optimizer_state_in_host_memory_is_reported_and_crosses_the_host_link_twice(tmp_path):
    result = plan.plan(tiny_config(tmp_path, "optim.offload_state=true"), "v5e:2x2")
    assert result.fits and result.host_argument_bytes >= result.optimizer_bytes > 0
    in_and_out = 2 * result.host_argument_bytes + 2 * result.host_temp_bytes  # one micro-batch
    assert result.speed.host_bytes == in_and_out and result.speed.host_s > 0
    assert "host: state" in plan.format_plan(result)


@pytest.mark.parametrize(
    ("remat", "save", "offload", "gathers_again"),
    [
        ("none", [], [], False),
        ("dots", [], [], False),
        ("dots_no_batch", [], [], False),
        ("save_all_dots", [], [], False),
        ("save_dot_except_mlpwi", [], [], True),
        ("save_dot_except_mlp", [], [], True),
        ("save_qkv_proj", [], [], True),
        ("save_out_proj", [], [], True),
        ("offload_dot_except_mlpwi", [], [], True),
        ("minimal", [], [], True),
        ("full", [], [], True),
        (
            "custom",
            ["query_proj", "key_proj", "value_proj", "out_proj", "mlp_down"],
            ["mlp_gate", "mlp_up"],
            False,
        ),
        ("custom", ["query_proj", "key_proj", "value_proj", "out_proj", "mlp_down"], ["mlp_gate"], True),
        ("custom", ["attention_out"], [], True),
        ("custom", ["query_proj", "key_proj", "value_proj", "out_proj"], ["mlp_gate", "mlp_up"], False),
    ],
)
def test_a_policy_that_recomputes_a_weight_matmul_gathers_its_weights_again(
    tmp_path, remat, save, offload, gathers_again
):
    keys = [f"model.remat={remat}", f"model.remat_save={save}", f"model.remat_offload={offload}"]
    config = tiny_config(tmp_path, *keys)
    assert plan.recomputes_weight_matmuls(config.model) is gathers_again
    mesh = {"data": 1, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    chip = CHIPS["TPU v5e"]
    without = plan.collective_seconds(tiny_config(tmp_path), mesh, 10**6, chip)
    assert (plan.collective_seconds(config, mesh, 10**6, chip) > without) is gathers_again


def test_expert_parallelism_trades_gathering_the_experts_for_sending_the_tokens(tmp_path):
    """Split four ways over `expert` rather than `fsdp`, a chip gathers a quarter of the experts'
    weights but sends every token's copies to other chips by all-to-all: cheaper with few tokens
    per chip, dearer with many."""
    moe = ["model.family=mixtral", "model.num_experts=8", "model.d_model=1024", "model.mlp_dim=4096"]
    over_fsdp = {"data": 1, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    over_expert = {**over_fsdp, "fsdp": 1, "expert": 4}
    chip = CHIPS["TPU v5e"]

    def seconds(rows: int, mesh) -> float:
        config = tiny_config(tmp_path, *moe, f"train.global_batch_size={rows}", "data.seq_len=1024")
        return plan.collective_seconds(config, mesh, 10**9, chip)

    assert seconds(4, over_expert) < seconds(4, over_fsdp)
    assert seconds(256, over_expert) > seconds(256, over_fsdp)
    assert (
        plan.all_to_all_hops((1,)) == 0
        and plan.all_to_all_hops((2,)) == 0.5
        and plan.all_to_all_hops((8,)) == 2
    )
    assert plan.all_to_all_hops((8, 8, 4)) == pytest.approx(5 / 3)  # DeepSeek-V3's 256 experts on a v5p-512


@pytest.mark.parametrize("experts", [0, 8])
def test_the_sweep_splits_experts_only_for_a_model_with_experts(experts):
    splits = plan_sweep.mesh_splits(8, experts=experts)
    assert all(math.prod(split) == 8 for split in splits)
    assert {split[2] for split in splits} == ({1, 2, 4, 8} if experts else {1})


def test_matmul_flops_counts_a_scan_body_once_per_iteration():
    def five_matmuls(x):
        return jax.lax.scan(lambda carry, _: (carry @ carry, None), x, length=5)[0]

    jaxpr = jax.make_jaxpr(five_matmuls)(jnp.ones((4, 3, 3)))
    assert matmul_flops(jaxpr.jaxpr) == 5 * 2 * 4 * 3 * 3 * 3


@needs_libtpu
def test_the_planned_step_runs_on_the_arrays_train_feeds_it(tmp_path):
    """The plan lowers `jit_train_step` for abstract inputs; compiled here for the CPU devices, the
    same executable accepts the real state and batch and computes what the train loop's step does."""
    config = tiny_config(tmp_path)
    setup, _, compiled, refusal = plan.compile_step(config, jax.devices())
    assert refusal is None
    rows, length = config.train.global_batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (rows, length), np.int32)
    host_batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        "segment_ids": np.ones((rows, length), np.int32),
        "loss_mask": np.ones((rows, length), np.int32),
    }
    batch = pipeline.to_global(host_batch, setup.batch_sharding)
    _, planned = compiled(setup.init(jax.random.key(0)), batch)
    _, trained = jit_train_step(config, setup)(setup.init(jax.random.key(0)), batch)
    assert float(planned["loss"]) == float(trained["loss"])


@needs_libtpu
def test_a_model_too_large_for_the_topology_does_not_fit_and_exits_nonzero():
    result = jaxlm_plan("configs/tiny.yaml", "--topology", "v5e:2x2", *TINY, *TOO_LARGE)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("does not fit: needs ") and "than the 15.75 GiB of a TPU v5e" in verdict


@needs_libtpu
def test_the_sweep_ranks_the_splits_that_fit_and_says_why_others_fail(tmp_path):
    config = tiny_config(tmp_path)  # 2 kv heads: 4-way tensor parallelism cannot shard them
    trials = plan_sweep.sweep(config, "v5e:2x2")
    # No remat fits every split at one micro-batch: nothing lighter to try, one compile per split.
    assert len(trials) == len(plan_sweep.mesh_splits(4)) == 6
    fitting = [trial for trial in trials if trial.fits]
    assert len(fitting) == 5 and trials[: len(fitting)] == fitting
    assert all(trial.plan.remat == "none" and trial.plan.micro_batches == 1 for trial in fitting)
    steps = [plan_sweep.step_rank_key(trial.plan.speed.step_s) for trial in fitting]
    assert steps == sorted(steps)
    (skipped,) = [trial for trial in trials if trial.skipped]
    assert "mesh.tensor=4" in skipped.overrides and "kv_heads=2" in skipped.skipped
    report = plan_sweep.format_sweep("v5e:2x2", trials).splitlines()
    assert "micro" in report[1] and "FLOPs×" in report[1]
    best = report[-1].split()
    assert best[0] == "best:" and best[1:] == fitting[0].overrides
    assert best[-2:] == ["model.remat=none", "train.micro_batches=1"]


GiB = 2**30
V5E = CHIPS["TPU v5e"]


def candidate(remat: str, micro_batches: int, peak_gib: float, step_s: float = 1.0) -> plan_sweep.Trial:
    """A trial as the sweep records it, with given figures: for the search's and ranking's logic."""
    figures = plan.Plan(
        topology="v5e:2x2",
        chip=V5E,
        chips=4,
        mesh={"data": 1, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1},
        remat=remat,
        param_count=0,
        param_bytes=0,
        optimizer_bytes=0,
        peak_bytes=int(peak_gib * GiB),
        hbm_bytes=V5E.hbm_bytes,
        micro_batches=micro_batches,
        flops_ratio=1.0,
    )
    if figures.fits:
        zero = {"flops": 0.0, "xla_bytes": 0.0, "memory_s": 0.0, "collective_s": 0.0, "xla_seconds": None}
        figures.speed = plan.Speed(
            **zero, model_flops=1.0, peak_flops=1.0, chips=4, tokens_per_step=1, compute_s=step_s
        )
    overrides = ["mesh.data=1", "mesh.fsdp=4", f"model.remat={remat}", f"train.micro_batches={micro_batches}"]
    return plan_sweep.Trial(overrides, plan=figures)


POLICIES = ("none", "save_all_dots", "save_dot_except_mlp", "full")
NEED_GIB = {
    "none": 60.0,
    "save_all_dots": 24.0,
    "save_dot_except_mlp": 18.0,
    "full": 12.0,
}  # at 1 micro-batch


def searched(counts: list[int]) -> tuple[list[plan_sweep.Trial], list[tuple[str, int]]]:
    tried = []

    def attempt(remat: str, micro_batches: int) -> plan_sweep.Trial:
        tried.append((remat, micro_batches))
        return candidate(remat, micro_batches, NEED_GIB[remat] / micro_batches)

    return plan_sweep.search(attempt, POLICIES, counts), tried


def test_the_search_tries_more_micro_batches_only_with_policies_that_recompute_less():
    found, tried = searched([1, 2, 4, 8])
    assert tried == [
        ("none", 1), ("save_all_dots", 1), ("save_dot_except_mlp", 1), ("full", 1),  # the first that fits
        ("save_dot_except_mlp", 2), ("save_all_dots", 2), ("none", 2),  # 9 and 12 GiB fit, 30 not
        ("none", 4),  # 15 GiB fits: nothing recomputes less, so 8 micro-batches are never tried
    ]  # fmt: skip
    assert [(trial.plan.remat, trial.plan.micro_batches) for trial in found] == [
        ("full", 1), ("save_all_dots", 2), ("none", 4)
    ]  # fmt: skip


def test_the_search_stops_when_no_remat_fits_or_counts_run_out_and_at_a_split_that_cannot_be_built():
    found, tried = searched([1])
    assert tried == [(policy, 1) for policy in POLICIES] and [trial.plan.remat for trial in found] == ["full"]
    light = {**NEED_GIB, "none": 6.0}
    assert plan_sweep.search(lambda r, m: candidate(r, m, light[r] / m), POLICIES, [1, 2]) == [
        candidate("none", 1, 6.0)
    ]
    cannot = plan_sweep.Trial(["mesh.tensor=4"], skipped="kv_heads=2")
    assert plan_sweep.search(lambda remat, micro: cannot, POLICIES, [1, 2]) == [cannot]


def test_nothing_fitting_at_one_micro_batch_tries_the_most_frugal_policy_with_more():
    huge = {remat: 4 * gib for remat, gib in NEED_GIB.items()}  # full: 48 GiB at 1, 12 GiB at 4
    tried = []

    def attempt(remat: str, micro_batches: int) -> plan_sweep.Trial:
        tried.append((remat, micro_batches))
        return candidate(remat, micro_batches, huge[remat] / micro_batches)

    found = plan_sweep.search(attempt, POLICIES, [1, 2, 4])
    assert tried[len(POLICIES) :] == [("full", 2), ("full", 4), ("save_dot_except_mlp", 4)]
    assert [(trial.plan.remat, trial.plan.micro_batches) for trial in found] == [("full", 4)]


def test_the_winner_is_the_fastest_candidate_that_fits_micro_batched_or_not():
    slow_full = candidate("full", 1, 12.0, step_s=1.25)
    fast_micro = candidate("save_all_dots", 2, 12.0, step_s=1.05)
    tie_more_memory = candidate("none", 4, 15.0, step_s=1.0504)  # ties at 3 significant figures
    too_big = candidate("none", 1, 60.0)
    trials = sorted([too_big, slow_full, tie_more_memory, fast_micro], key=plan_sweep.rank)
    assert trials == [fast_micro, tie_more_memory, slow_full, too_big]
    report = plan_sweep.format_sweep("v5e:2x2", trials).splitlines()
    assert report[-1] == "best: mesh.data=1 mesh.fsdp=4 model.remat=save_all_dots train.micro_batches=2"
    assert report[5].split()[:2] == ["-", "1"] and report[5].endswith("does not fit")


def test_a_program_refused_for_host_memory_says_so_and_how_much():
    # The TPU compiler's words for Llama-2-70B offloading the MLP's gate and up projections
    # (docs/planning.md): it holds each chip's pinned host memory to 128 GiB.
    refusal = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space host. "
        "Used 140.00G of 128.00G host. Exceeded host capacity by 12.00G."
    )
    refused = candidate("custom", 1, 0.0).plan
    refused.refusal, refused.speed, refused.flops_ratio = refusal, None, 1.11
    assert not refused.fits
    assert plan.verdict(refused).startswith(
        "does not fit: needs 140.00 GiB of pinned host memory per chip, 12.00 GiB more than the 128.00 GiB"
    )
    assert (
        "peak                 not known   the compiler stopped before; 1.11× the model FLOPs"
        in plan.format_plan(refused)
    )


@needs_libtpu
def test_an_unknown_topology_is_a_config_error():
    with pytest.raises(ConfigError, match="--topology v9z:2x2 is not a TPU topology JAX can build"):
        plan.topology_devices("v9z:2x2")


def test_without_libtpu_the_plan_says_how_to_install_it():
    result = jaxlm_plan(
        "configs/tiny.yaml", "--topology", "v5e:2x2", python_prelude="sys.modules['libtpu'] = None; "
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and 'pip install -e ".[tpu]"' in errors[0], result.stderr
