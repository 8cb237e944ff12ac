"""`jaxlm plan`: the real train step compiled for a TPU topology on this CPU host (libtpu's
compiler, compile-only devices), its memory verdict, its figures and the sweep."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY, tiny_config

from jaxlm import plan
from jaxlm.data import pipeline
from jaxlm.errors import ConfigError
from jaxlm.metrics import matmul_flops
from jaxlm.setup import jit_train_step

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
    assert result.mesh == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    assert result.argument_bytes > 0 and result.peak_bytes < result.hbm_bytes
    assert result.param_bytes * result.chips == result.param_count * 4  # float32, sharded 4 ways
    speed = result.speed
    # Without remat the matmuls counted in the compiled step are exactly the model FLOPs.
    assert speed.flops * result.chips == pytest.approx(speed.model_flops, rel=1e-9)
    assert speed.step_s == max(speed.compute_s, speed.memory_s, speed.collective_s) > 0
    assert 0 < speed.mfu <= 1 and speed.tokens_per_s > 0
    assert plan.format_plan(result).endswith(plan.verdict(result))
    assert plan.verdict(result).startswith("fits: ")


@needs_libtpu
def test_full_remat_counts_the_recomputed_forward_pass(tmp_path):
    none = plan.plan(tiny_config(tmp_path), "v5e:2x2")
    full = plan.plan(tiny_config(tmp_path, "model.remat=full"), "v5e:2x2")
    assert 1.1 < full.speed.flops / none.speed.flops < 4 / 3 + 1e-9


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
    trials = plan.sweep(config, "v5e:2x2")
    assert len(trials) == len(plan.mesh_splits(4)) == 6
    fitting = [trial for trial in trials if trial.plan and trial.plan.fits]
    assert len(fitting) == 5 and trials[: len(fitting)] == fitting
    steps = [plan.step_rank_key(trial.plan.speed.step_s) for trial in fitting]
    assert steps == sorted(steps)
    assert all(trial.plan.remat == "none" for trial in fitting)  # the least recomputation that fits
    (skipped,) = [trial for trial in trials if trial.skipped]
    assert "mesh.tensor=4" in skipped.overrides and "kv_heads=2" in skipped.skipped
    report = plan.format_sweep("v5e:2x2", trials)
    assert report.splitlines()[-1] == f"best: {' '.join(fitting[0].overrides)}"


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
