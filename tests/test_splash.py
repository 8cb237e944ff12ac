"""Splash attention (JAX's Pallas kernel, run here in interpret mode on CPU) computes what the XLA
einsums compute: outputs and gradients, with packed documents, grouped-query heads, rows of any
length, and under context parallelism's load-balanced layout on a mesh; a model with it trains
as one with XLA attention; the set-up refuses what it cannot run, in one line."""

import contextlib
import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from flax import nnx

from jaxlm import parallel
from jaxlm.config import MESH_AXES, default_rules
from jaxlm.errors import ConfigError
from jaxlm.model import registry, splash
from jaxlm.model.layers import AttentionKernel, attention_mask, xla_attention
from jaxlm.training.metrics import matmul_flops
from jaxlm.training.setup import build_model

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32


def packed_segments(rows: int, length: int, seed: int) -> np.ndarray:
    """[rows, length] int32: documents of random lengths, each row ending in padding (segment 0)."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((rows, length), np.int32)
    for row in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, length - 8), size=4, replace=False))
        for document, (start, end) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True), start=1):
            segments[row, start:end] = 10 * row + document
    return segments


def qkv(rows: int, length: int, head_dim: int = HEAD_DIM):
    keys = jax.random.split(jax.random.key(1), 3)
    return (
        jax.random.normal(keys[0], (rows, length, HEADS, head_dim)),
        jax.random.normal(keys[1], (rows, length, KV_HEADS, head_dim)),
        jax.random.normal(keys[2], (rows, length, KV_HEADS, head_dim)),
    )


def output_and_grads(attend, q, k, v):
    """attend(q, k, v) and the gradients of a weighted sum of it (a different weight per
    channel, so no gradient is trivially zero) for q, k and v."""
    weights = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(jnp.broadcast_to(weights, out.shape))


def assert_close(actual, expected, rtol=2e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        scale = float(jnp.max(jnp.abs(e)))
        assert scale > 0
        assert float(jnp.max(jnp.abs(a - e))) <= rtol * scale


def xla_reference(segments):
    return lambda q, k, v: xla_attention(q, k, v, attention_mask(jnp.asarray(segments)))


# 200 tokens: padded to the kernel's 128-token blocks; head_dim 128 keeps keys and values
# head-minor, narrower heads sequence-minor (`splash.block_sizes`).
@pytest.mark.parametrize(("length", "head_dim"), [(256, 128), (200, HEAD_DIM)])
def test_splash_gives_the_outputs_and_gradients_of_xla_attention_on_packed_rows(length, head_dim):
    segments = packed_segments(2, length, seed=length)
    q, k, v = qkv(2, length, head_dim)

    def attend(q, k, v):
        return splash.splash_attention(q, k, v, jnp.asarray(segments), None, 128, 128, interpret=True)

    assert_close(
        jax.jit(output_and_grads, static_argnums=0)(attend, q, k, v),
        output_and_grads(xla_reference(segments), q, k, v),
    )


# tensor=4 splits the 4 query heads but not the 2 kv heads: each kv head goes to two devices.
@pytest.mark.parametrize(
    "mesh_shape",
    [{"data": 2, "context": 2, "tensor": 2}, {"fsdp": 2, "context": 4}, {"context": 2, "tensor": 4}],
)
def test_under_context_parallelism_splash_in_the_balanced_layout_gives_xla_in_row_order(mesh_shape):
    length = 512
    shape = tuple(mesh_shape.get(axis, 1) for axis in MESH_AXES)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=parallel.AUTO_AXES)
    order = parallel.load_balanced_order(length, mesh_shape["context"])
    natural = np.argsort(order)
    segments = packed_segments(2, length, seed=7)
    q, k, v = qkv(2, length)

    def attend(q, k, v):  # row order in and out, the balanced layout inside
        with parallel.activation_sharding(mesh, default_rules("llama")):
            assert parallel.context_shards() == mesh_shape["context"]
            out = splash.splash_attention(
                q[:, order], k[:, order], v[:, order], jnp.asarray(segments[:, order]), order, 128, 128, True
            )
        return out[:, natural]

    step = jax.jit(output_and_grads, static_argnums=0)
    assert_close(step(attend, q, k, v), output_and_grads(xla_reference(segments), q, k, v))
    # Each device computes its own queries: the kernel runs in a shard_map over the mesh.
    assert "shard_map" in str(jax.make_jaxpr(attend)(q, k, v))


# A window that cuts blocks (100 of 128-token ones) and one of whole blocks; and under context
# parallelism's balanced layout, whose query blocks are not in order.
@pytest.mark.parametrize(("window", "context"), [(100, 1), (128, 1), (100, 2)])
def test_splash_with_a_sliding_window_gives_xla_attention_with_that_window(window, context):
    length = 512
    segments = packed_segments(2, length, seed=window + context)
    q, k, v = qkv(2, length)
    mesh = jax.make_mesh((1, 1, 1, context, 1), MESH_AXES, axis_types=parallel.AUTO_AXES)
    order = None if context == 1 else parallel.load_balanced_order(length, context)
    layout = np.arange(length) if order is None else order

    def attend(q, k, v):
        with parallel.activation_sharding(mesh, default_rules("mistral")):
            rows = [x[:, layout] for x in (q, k, v)]
            out = splash.splash_attention(
                *rows, jnp.asarray(segments[:, layout]), order, 128, 128, True, window
            )
        return out[:, np.argsort(layout)]

    def windowed(q, k, v):
        return xla_attention(q, k, v, attention_mask(jnp.asarray(segments), window=window))

    assert_close(
        jax.jit(output_and_grads, static_argnums=0)(attend, q, k, v), output_and_grads(windowed, q, k, v)
    )


def test_a_window_skips_the_blocks_before_it():
    """Of 4 × 4 blocks of 128 tokens, causal attention runs the 10 on and below the diagonal; a
    128-token window the 4 on it and the 3 beside (a query sees its own block and the one before),
    in a grid the kernel shrinks to the 2 key blocks a query block meets at most."""
    blocks = splash.block_sizes(512, 512, 128, 128)
    causal, windowed = (splash._kernel(1, 512, 1, None, blocks, True, window) for window in (None, 128))
    assert splash.blocks_run_scope(causal) == "blocks_run_10_of_16"
    assert splash.blocks_run_scope(windowed) == "blocks_run_7_of_8"


def model_loss_and_grads(config, mesh=None):
    """A tiny model's mean next-token loss on packed rows, and its gradients, with the attention
    kernel the config names (auto: XLA's); with a mesh, under its activation sharding, the rows
    laid out for its context parallelism as the train step lays them out."""
    kind = "xla" if config.attention.kernel == "auto" else config.attention.kernel
    model = registry.build(config.model, nnx.Rngs(0), AttentionKernel.of(config.attention, kind))
    graphdef, params = nnx.split(model, nnx.Param)
    length = config.data.seq_len
    segments = jnp.asarray(packed_segments(2, length, seed=3))
    starts = jnp.concatenate([jnp.ones((2, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    index = jnp.arange(length)
    positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # restart per document
    tokens = jax.random.randint(jax.random.key(0), (2, length + 1), 0, config.model.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    shards = 1 if mesh is None else mesh.shape["context"]
    order = None if shards == 1 else parallel.load_balanced_order(length, shards)
    layout = np.arange(length) if order is None else order

    def loss(params):
        rows = [x[:, layout] for x in (inputs, positions, segments, targets)]
        logits = nnx.merge(graphdef, params)(*rows[:3], order=order).logits
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), rows[3][..., None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    rules = default_rules(config.model.family)
    with contextlib.nullcontext() if mesh is None else parallel.activation_sharding(mesh, rules):
        # The kernel named runs: a Pallas call for splash, none for XLA's einsums.
        assert ("pallas_call" in str(jax.make_jaxpr(step)(params))) == (kind == "splash")
        return step(params)


@pytest.fixture(scope="module")
def xla_model_reference(tmp_path_factory):
    """Loss and gradients of the tiny Llama with XLA attention on one device, rows in order."""
    config = tiny_config(tmp_path_factory.mktemp("xla"), "data.seq_len=256", "attention.kernel=xla")
    return model_loss_and_grads(config)


SPLASH = [
    "data.seq_len=256",
    "attention.kernel=splash",
    "attention.splash_interpret=true",
    "attention.splash_block_q=128",
]


def test_a_model_with_splash_attention_has_the_loss_and_gradients_of_xla_attention(
    tmp_path, xla_model_reference
):
    assert_close(
        model_loss_and_grads(tiny_config(tmp_path, *SPLASH, "attention.splash_block_kv=128")),
        xla_model_reference,
    )


def test_under_context_parallelism_the_model_with_splash_has_the_loss_and_gradients_of_one_device(
    tmp_path, xla_model_reference
):
    mesh = jax.make_mesh(
        (2, 1, 1, 2, 2), MESH_AXES, axis_types=parallel.AUTO_AXES
    )  # data, fsdp, expert, context, tensor
    assert_close(model_loss_and_grads(tiny_config(tmp_path, *SPLASH), mesh), xla_model_reference)


# Mistral's one window, unrolled; Gemma 3's local and global layers in a scan: a switch between
# two kernels, each layer's chosen by its kind.
@pytest.mark.parametrize(
    "family",
    [
        ["model.family=mistral", "model.sliding_window=100", "model.scan_layers=false"],
        [
            "model.family=gemma3",
            "model.sliding_window=100",
            "model.sliding_window_pattern=2",
            "model.scan_layers=true",
        ],
    ],
    ids=["mistral", "gemma3"],
)
def test_a_windowed_family_with_splash_has_the_loss_and_gradients_of_xla_attention(tmp_path, family):
    xla = model_loss_and_grads(tiny_config(tmp_path, *family, "data.seq_len=256", "attention.kernel=xla"))
    assert_close(model_loss_and_grads(tiny_config(tmp_path, *family, *SPLASH)), xla)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [],
            r"^attention.kernel=splash runs on TPU, and these devices are cpu; use attention.kernel=auto \(or xla\), or attention.splash_interpret=true",
        ),
        (
            ["attention.splash_interpret=true", "data.seq_len=200"],
            r"^data.seq_len=200 over mesh.context=1 does not give .* use a data.seq_len that is a multiple of 128, or attention.kernel=xla$",
        ),
        (
            ["attention.splash_interpret=true", "data.seq_len=384", "mesh.context=2", "mesh.fsdp=4"],
            r"^data.seq_len=384 over mesh.context=2 .* a multiple of 256, or attention.kernel=xla$",
        ),
        (
            ["attention.splash_interpret=true", "data.seq_len=768", "attention.splash_block_q=512"],
            r"^attention.splash_block_q=512 does not divide the 768 tokens of a context shard .*; use one of 128, 256, 384, 768, or null$",
        ),
        (
            [
                "attention.splash_interpret=true",
                "data.seq_len=512",
                "mesh.context=2",
                "mesh.fsdp=4",
                "attention.splash_block_kv=384",
            ],
            r"^attention.splash_block_kv=384 does not divide data.seq_len=512 .*; use one of 128, 256, 512, or null$",
        ),
    ],
)
def test_splash_that_cannot_run_is_one_line_naming_the_fix_before_compiling(tmp_path, overrides, message):
    config = tiny_config(tmp_path, "attention.kernel=splash", "data.seq_len=256", *overrides)
    with pytest.raises(ConfigError, match=message):
        build_model(config)


def test_splash_runs_where_asked_and_auto_keeps_xla_off_tpu(tmp_path):
    config = tiny_config(
        tmp_path, "attention.kernel=splash", "attention.splash_interpret=true", "data.seq_len=256"
    )
    assert build_model(config).attention == "splash"
    assert build_model(tiny_config(tmp_path, "data.seq_len=256")).attention == "xla"


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu comes with pip install -e ".[test]"'
)
def test_auto_is_splash_on_tpu_for_rows_its_blocks_cut_and_xla_for_others(tmp_path):
    from jaxlm.planning.plan import topology_devices

    devices = topology_devices("v5e:2x2")
    assert build_model(tiny_config(tmp_path, "data.seq_len=256"), devices).attention == "splash"
    assert build_model(tiny_config(tmp_path, "data.seq_len=32"), devices).attention == "xla"
    explicit = tiny_config(tmp_path, "data.seq_len=32", "attention.kernel=splash")
    with pytest.raises(ConfigError, match=r"^data.seq_len=32 over mesh.context=1"):
        build_model(explicit, devices)


def test_plans_count_the_kernels_matmuls_in_the_blocks_it_runs_on_every_device():
    # `jaxlm plan`'s FLOPs come from the traced step: the kernel's body is one block of one
    # device, run once per grid cell that the causal mask leaves work in, in a shard_map body run
    # once per device.
    rows, length = 2, 512
    mesh = jax.make_mesh((1, 2, 1, 2, 2), MESH_AXES, axis_types=parallel.AUTO_AXES)
    order = parallel.load_balanced_order(length, 2)
    q, k, v = qkv(rows, length)

    def attend(q, k, v):
        with parallel.activation_sharding(mesh, default_rules("llama")):
            return splash.splash_attention(
                q, k, v, jnp.ones((rows, length), jnp.int32), order, 128, 128, True
            )

    # A 128-query block of a shard (its positions in layout order) meets a 128-key block (in
    # natural order) when its latest original position reaches the key block's first.
    latest = order.reshape(-1, 128).max(axis=1)  # per query block, both shards in turn
    blocks_run = int(np.sum(latest[:, None] >= np.arange(0, length, 128)[None, :]))
    block = 2 * 2 * rows * HEADS * 128 * 128 * HEAD_DIM  # q·kᵀ and p·v of one block, every head
    assert blocks_run < (length // 128) ** 2
    assert matmul_flops(jax.make_jaxpr(attend)(q, k, v).jaxpr) == blocks_run * block


def test_the_attention_bench_times_both_paths_and_says_interpret_mode_is_no_speed_figure():
    args = ["--length", "256", "--heads", "4", "--kv-heads", "2", "--iters", "1", "--memory-lengths", "512"]
    result = subprocess.run(
        [sys.executable, "bench/attention.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    times = {line["path"]: line for line in lines if line["measure"] == "fwd_bwd_time"}
    assert set(times) == {"xla", "splash"} and all(line["fwd_bwd_ms"] > 0 for line in times.values())
    assert times["splash"]["note"] == "Pallas interpret mode on cpu: not a speed figure"
    assert "note" not in times["xla"]
    # Off TPU only XLA's memory is compiled: interpret mode's would not be the kernel's.
    (memory,) = [line for line in lines if line["measure"] == "compiled_memory"]
    assert memory["path"] == "xla" and memory["length"] == 512 and memory["temp_bytes"] > 0
