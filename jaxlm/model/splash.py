"""Splash attention: the Pallas flash-attention kernel for TPU that ships with JAX, causal in the
rows' original token order and never across packed documents, grouped-query, forward and backward.

Scores are computed a [block_q, block_kv] tile at a time and never stored whole, so attention's
memory grows with the length, not its square; tiles above the causal diagonal (and, with a
sliding window, before it) are skipped.

Under context parallelism (`parallel.activation_sharding` with a `length` rule) rows arrive in
the load-balanced layout of `parallel.load_balanced_order`: each device keeps its queries and
gathers every key and value of its rows (the all-gather of context parallelism), puts them back
in natural order, and tells the kernel each query's original position, so one causal kernel
serves any layout.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import parallel
from jaxlm.config import AttentionConfig
from jaxlm.errors import ConfigError

LANES = 128  # the kernel's blocks are whole multiples of the TPU's 128 lanes
DEFAULT_BLOCK = 512  # MaxText's default for every splash block (its sa_block_* keys)
PADDING_SEGMENT = -1  # segment id of the tokens padded in here: no real token's (0 is padding's)


def block_size(length: int, wanted: int | None) -> int:
    """The block a `length`-token sequence is cut into: the largest multiple of 128 that divides
    it and is at most `wanted` (null: 512)."""
    limit = min(wanted or DEFAULT_BLOCK, length)
    return next(size for size in range(limit - limit % LANES, 0, -LANES) if length % size == 0)


def block_sizes(
    q_length: int, kv_length: int, block_q: int | None, block_kv: int | None, head_dim: int = LANES
):
    """The kernel's `BlockSizes` for queries of `q_length` tokens (one context shard's) over keys
    of `kv_length`: the backward pass's blocks are the forward's. Heads narrower than the 128
    lanes keep keys and values with the sequence minor: head-minor, their tiles would be padded
    to 128 lanes (with a remat policy that saves projections, the compiled gpt2_small step at
    head_dim 64 peaked 0.85 GiB higher than with XLA's attention; sequence-minor, level)."""
    q_block, kv_block = block_size(q_length, block_q), block_size(kv_length, block_kv)
    layout = (
        splash_kernel.QKVLayout.HEAD_DIM_MINOR if head_dim % LANES == 0 else splash_kernel.QKVLayout.SEQ_MINOR
    )
    return splash_kernel.BlockSizes(
        k_layout=layout,
        v_layout=layout,
        block_q=q_block,
        block_kv=kv_block,
        block_kv_compute=kv_block,
        block_q_dkv=q_block,
        block_kv_dkv=kv_block,
        block_kv_dkv_compute=kv_block,
        block_q_dq=q_block,
        block_kv_dq=kv_block,
    )


def rows_fit(seq_len: int, context: int) -> bool:
    """Whether rows of `seq_len` tokens split `context` ways give every shard whole 128-token
    blocks (attention.kernel=auto takes splash on TPU only then)."""
    return seq_len % context == 0 and (seq_len // context) % LANES == 0


def length_problem(seq_len: int, context: int, block_q: int | None, block_kv: int | None) -> str | None:
    """Why rows of `seq_len` tokens split `context` ways do not cut into the splash blocks (a
    one-line error naming the fix), or None when they do."""
    per_shard = seq_len // context
    if not rows_fit(seq_len, context):
        return (
            f"data.seq_len={seq_len} over mesh.context={context} does not give each context shard a "
            f"multiple of {LANES} tokens, as splash attention's blocks need; use a data.seq_len that "
            f"is a multiple of {LANES * context}, or attention.kernel=xla"
        )
    for key, value, length, what in (
        ("splash_block_q", block_q, per_shard, f"the {per_shard} tokens of a context shard"),
        ("splash_block_kv", block_kv, seq_len, f"data.seq_len={seq_len}"),
    ):
        if value is not None and (value % LANES or length % value):
            fits = ", ".join(str(size) for size in range(LANES, length + 1, LANES) if length % size == 0)
            return f"attention.{key}={value} does not divide {what} in multiples of {LANES}; use one of {fits}, or null"
    return None


class CausalInOrder(splash_mask.CausalMask):
    """Causal over original positions: query row p (at original position `order[p]`) sees keys
    0..order[p], with the keys in natural order; with a `window`, only the `window` keys up to
    its own (order[p] - window < key <= order[p]: Mistral's and Gemma's local attention). The
    kernel computes it per tile from each query's position (its `q_sequence`), never storing a
    [length, length] mask, and skips the blocks it leaves empty (above the diagonal, and before
    the window)."""

    def __init__(self, length: int, order: np.ndarray | None, window: int | None = None):
        super().__init__((length, length))
        self.window = window
        if order is not None:
            self.q_sequence = np.asarray(order, np.int32)
        if window is not None:

            def windowed(q_ids, kv_ids):  # NumPy views in the block map, traced ids in the kernel
                return (q_ids >= kv_ids) & (q_ids - kv_ids < window)

            self.mask_function = windowed

    def __getitem__(self, index) -> np.ndarray:
        """A block of the mask. The kernel's block map reads every block once per pass: blocks
        wholly inside or outside what queries see are filled without comparing each pair (at
        128k tokens that comparing took a minute)."""
        rows, columns = index
        positions = self.q_sequence[rows]
        first, stop, _ = columns.indices(self.shape[1])
        shape = (len(positions), stop - first)
        reach = self.shape[1] if self.window is None else self.window  # keys seen back, itself included
        if positions.min() >= stop - 1 and positions.max() - first < reach:
            return np.ones(shape, np.bool_)
        if positions.max() < first or positions.min() - (stop - 1) >= reach:
            return np.zeros(shape, np.bool_)
        return super().__getitem__(index)

    def __eq__(self, other: object):
        if not isinstance(other, CausalInOrder):
            return NotImplemented
        return super().__eq__(other) and self.window == other.window

    def __hash__(self):
        return hash((super().__hash__(), self.window))


@functools.lru_cache(maxsize=32)
def _kernel(
    heads: int, length: int, q_shards: int, order: bytes | None, blocks, interpret: bool, window: int | None
):
    """The kernel for `heads` query heads of `length`-token rows whose queries are split
    `q_shards` ways, built once: its mask's block map is computed in NumPy on the host."""
    positions = None if order is None else np.frombuffer(order, np.int32)
    mask = splash_mask.MultiHeadMask([CausalInOrder(length, positions, window)] * heads)
    # The block map becomes device arrays at build time; built inside a trace they would be
    # tracers, which this cache would leak into the next trace.
    with jax.ensure_compile_time_eval():
        return splash_kernel.make_splash_mha(
            mask,
            block_sizes=blocks,
            head_shards=1,
            q_seq_shards=q_shards,
            interpret=interpret,
            # The output and its log-sum-exp, which the backward kernel needs: a remat policy
            # that saves "attention_out" keeps them instead of running the forward kernel again.
            residual_checkpoint_name="attention_out",
        )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    order: np.ndarray | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
    window: int | None = None,
) -> jax.Array:
    """Grouped-query attention with the splash kernel: q [batch, length, heads, head_dim], k and v
    [batch, length, kv_heads, head_dim], segment_ids [batch, length] int32, all laid out by
    `order` ([length]: each position's original position; None = natural order) → like q.

    Position p attends position r when order[r] <= order[p] and their segment ids are equal
    (and, with a `window`, order[p] - order[r] < window). block_q, block_kv: the largest kernel blocks wanted (`block_size`); interpret: run the
    kernel in Pallas interpret mode (any backend, slow: for tests)."""
    _, length, heads, head_dim = q.shape
    context = parallel.activation_context()
    layout = None if context is None else _Layout(q.shape, k.shape[2], *context)
    shards = 1 if layout is None else layout.length_shards
    padded = -(-length // (LANES * shards)) * LANES * shards
    if padded != length:
        if order is not None:
            raise ValueError(
                f"rows of {length} tokens in a context layout must split into {shards} × {LANES}"
            )
        return _padded(q, k, v, segment_ids, padded, block_q, block_kv, interpret, window)
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    inverse = None if order is None else np.argsort(order)
    blocks = block_sizes(_query_run(order, length // shards), length, block_q, block_kv, head_dim)
    order_key = None if order is None else np.asarray(order, np.int32).tobytes()
    heads_here = heads if layout is None else heads // layout.head_shards
    if layout is not None and layout.kv_repeats > 1:
        k, v = (jnp.repeat(x, layout.kv_repeats, axis=2) for x in (k, v))  # query groups stay whole
    kernel = _kernel(heads_here, length, shards, order_key, blocks, interpret, window)
    attend = functools.partial(_attend, natural_order=inverse)
    if layout is not None:
        attend = jax.shard_map(
            attend,
            mesh=layout.mesh,
            in_specs=(
                layout.kernel_spec(kernel),
                layout.q,
                layout.kv,
                layout.kv,
                layout.q_segments,
                layout.kv_segments,
            ),
            out_specs=layout.q,
            check_vma=False,
        )
    with jax.named_scope(blocks_run_scope(kernel)):  # for `jaxlm.training.metrics.matmul_flops`
        return attend(kernel, q, k, v, segment_ids, segment_ids).astype(q.dtype)


@jax.tree_util.register_pytree_node_class
class Documents:
    """What splash attention keeps packed documents apart with, per kind of layer: the segment ids
    [batch, length] and this layer's kind (leaves, so a scan over layers of several kinds selects
    them as it selects the rotary tables), and, static, the rows' `order` and every kind's
    window. Gemma 3's local and global layers run two kernels: one per window."""

    def __init__(self, segment_ids, kind, order: bytes | None, windows: tuple[int | None, ...]):
        self.segment_ids, self.kind, self.order, self.windows = segment_ids, kind, order, windows

    def tree_flatten(self):
        return (self.segment_ids, self.kind), (self.order, self.windows)

    @classmethod
    def tree_unflatten(cls, static, leaves):
        return cls(*leaves, *static)

    def attend(self, q, k, v, block_q: int | None, block_kv: int | None, interpret: bool) -> jax.Array:
        """`splash_attention` with this layer's window; where the kind is traced (layers of
        several windows in a scan), a switch between the kernels of each."""
        order = None if self.order is None else np.frombuffer(self.order, np.int32)

        def attend(window, q, k, v):
            return splash_attention(q, k, v, self.segment_ids, order, block_q, block_kv, interpret, window)

        if len(set(self.windows)) == 1 or isinstance(self.kind, int):
            return attend(self.windows[0 if len(set(self.windows)) == 1 else self.kind], q, k, v)
        branches = [functools.partial(attend, window) for window in self.windows]
        return jax.lax.switch(self.kind, branches, q, k, v)


BLOCKS_RUN = re.compile(r"blocks_run_(\d+)_of_(\d+)")


def blocks_run_scope(kernel) -> str:
    """A name scope saying how many of the kernel's blocks it runs, of all of its grid's: those
    of its mask's block map that are not empty (the backward kernels, with the same blocks, run
    the same ones). Counting FLOPs, `jaxlm.training.metrics.matmul_flops` reads it: the grid runs its body
    in every cell, but skipped blocks do no matmul."""
    block_mask = np.asarray(kernel.fwd_mask_info.block_mask)  # [heads, q blocks, kv blocks]
    return f"blocks_run_{np.count_nonzero(block_mask)}_of_{block_mask.size}"


def _query_run(order: np.ndarray | None, per_shard: int) -> int:
    """The length query blocks should divide: a shard's, or under a layout the longest that also
    divides every run of consecutive positions in it (the load-balanced layout's chunks), so no
    block straddles two runs and the kernel skips exactly the blocks above the diagonal."""
    if order is None:
        return per_shard
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    runs = np.diff(np.concatenate([[0], breaks, [len(order)]]))
    aligned = math.gcd(per_shard, *runs.tolist())
    return aligned if aligned % LANES == 0 else per_shard


def _padded(q, k, v, segment_ids, padded: int, block_q, block_kv, interpret, window) -> jax.Array:
    """Rows padded to `padded` tokens (a segment of their own, after every real token, so no
    real query sees them), attended, and cut back."""
    length = q.shape[1]

    def pad(x, value=0):
        return jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    segments = pad(segment_ids, PADDING_SEGMENT)
    out = splash_attention(pad(q), pad(k), pad(v), segments, None, block_q, block_kv, interpret, window)
    return out[:, :length]


def _attend(kernel, q, k, v, q_segments, kv_segments, natural_order: np.ndarray | None):
    """The kernel over each row: q [batch, q_length, heads, head_dim] and q_segments [batch,
    q_length] in layout order; k, v [batch, length, kv_heads, head_dim] and kv_segments [batch,
    length] in layout order, put back in natural order by `natural_order` (None: already)."""
    if natural_order is not None:
        k, v, kv_segments = (_take_positions(x, natural_order) for x in (k, v, kv_segments))

    def one_row(q, k, v, q_segments, kv_segments):  # heads first for the kernel
        segments = splash_kernel.SegmentIds(q=q_segments, kv=kv_segments)
        out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), segments)
        return out.swapaxes(0, 1)

    return jax.vmap(one_row)(q, k, v, q_segments, kv_segments)


def _take_positions(x: jax.Array, positions: np.ndarray) -> jax.Array:
    """x[:, positions] as slices of its runs of consecutive positions (a load-balanced layout
    has 2 × shards): copies, where a gather's gradient would be a scatter."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(positions)]])
    if len(starts) > 64:
        return jnp.take(x, positions, axis=1)
    runs = [
        jax.lax.slice_in_dim(x, positions[s], positions[s] + e - s, axis=1)
        for s, e in zip(starts, ends, strict=True)
    ]
    return jnp.concatenate(runs, axis=1)


class _Layout:
    """How the kernel's inputs split over the mesh inside a shard_map, by the logical-axis rules:
    rows by `batch`, queries by `length` (context parallelism), query heads by `act_heads` when
    the kv heads' rule names the same axes. Every device then holds whole query groups: where
    the kv heads are fewer than the head shards (8 on 16-way tensor parallelism), each is
    repeated `kv_repeats` times first, not computed on every device. A dimension its mesh axes
    do not divide stays whole, as `parallel.constrain` leaves it."""

    def __init__(self, q_shape, kv_heads: int, mesh: Mesh, rules: parallel.Rules):
        self.mesh = mesh
        q = self._dividing(parallel.logical_to_spec(("batch", "length", "act_heads", None), rules), q_shape)
        kv_head_axes = parallel.logical_to_spec(("batch", None, "act_kv_heads", None), rules)[2]
        head_axes = q[2] if q[2] == kv_head_axes else None
        self.q = PartitionSpec(q[0], q[1], head_axes, None)
        self.kv = PartitionSpec(q[0], None, head_axes, None)
        self.q_segments, self.kv_segments = PartitionSpec(q[0], q[1]), PartitionSpec(q[0], None)
        self.length_shards, self.head_shards = self._size(q[1]), self._size(head_axes)
        self.kv_repeats = self.head_shards // math.gcd(kv_heads, self.head_shards)

    def kernel_spec(self, kernel):
        """The kernel's own specs: its block map split like the queries, along the sequence."""
        return kernel.manual_sharding_spec(NamedSharding(self.mesh, PartitionSpec(None, self.q[1])))

    def _size(self, axes) -> int:
        return parallel.axis_size(self.mesh, axes)

    def _dividing(self, spec: PartitionSpec, shape) -> PartitionSpec:
        return PartitionSpec(
            *(axes if dim % self._size(axes) == 0 else None for dim, axes in zip(shape, spec, strict=False))
        )


def check_config(attention: AttentionConfig, seq_len: int, device: jax.Device, context: int) -> None:
    """What attention.kernel=splash asks of the devices and the row length, one line each before
    compiling: a TPU (or interpret mode), and rows that cut into its blocks on every context shard."""
    if device.platform != "tpu" and not attention.splash_interpret:
        raise ConfigError(
            f"attention.kernel=splash runs on TPU, and these devices are {device.device_kind}; use "
            "attention.kernel=auto (or xla), or attention.splash_interpret=true (Pallas interpret mode: slow, for tests)"
        )
    problem = length_problem(seq_len, context, attention.splash_block_q, attention.splash_block_kv)
    if problem:
        raise ConfigError(problem)
