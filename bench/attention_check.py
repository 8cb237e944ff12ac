"""Attention kernels on this machine's first device: are they right on packed rows, and how fast.

For rows packed with several documents each, every implementation's output and its gradients
with respect to q, k and v are compared with jaxlm's XLA attention computed in float32
(relative error ‖x − ref‖ / ‖ref‖), then a forward + backward pass is timed (median of
--iters, after a warm-up). Implementations:

- xla: `jaxlm.model.layers.xla_attention` with the document mask (what attention.kernel=xla runs);
- cudnn_packed_maxM: `jaxlm.model.layers.cudnn_attention`, cuDNN's flash kernel on the packed
  layout (what attention.kernel=cudnn runs), for each M of --max-documents (fewer slots than
  --documents merge documents: a large error, by design);
- cudnn_mask: jax.nn.dot_product_attention(implementation="cudnn") given the dense mask;
- cudnn_packed_causal_type: the packed layout with cuDNN's CAUSAL mask type instead of
  PADDING_CAUSAL (both were right on an H100; jaxlm uses PADDING_CAUSAL);
- cudnn_causal: jax.nn.dot_product_attention with is_causal=True and no mask (right only for one
  document per row; its error on packed rows is expected to be large: it shows what the
  document boundaries cost).

Prints one JSON line per implementation; one that cannot run here (cuDNN needs an NVIDIA GPU,
the packed layout a Hopper one) reports its error instead.

    python bench/attention_check.py --batch 8 --length 2048 --heads 32 --kv-heads 8 --head-dim 64
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.layers import attention_mask, cudnn_attention, document_spans, xla_attention


def packed_segment_ids(batch: int, length: int, documents: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, length] int32 segment ids, each row cut into `documents` runs at random points."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [length]]))
        rows.append(np.repeat(np.arange(1, documents + 1), sizes))
    return np.stack(rows).astype(np.int32)


def relative_error(x: jax.Array, ref: jax.Array) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def fwd_bwd(attend: Callable) -> Callable:
    """jit of (q, k, v, grad) → (out, (dq, dk, dv)) for attend(q, k, v)."""

    def run(q, k, v, grad):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(grad)

    return jax.jit(run)


def median_seconds(fn: Callable, args: tuple, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--documents", type=int, default=4, help="documents packed in each row")
    parser.add_argument("--max-documents", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    b, t, h, kv, d = args.batch, args.length, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kv, d), jnp.bfloat16)
    grad = jax.random.normal(keys[3], (b, t, h, d), jnp.bfloat16)
    segment_ids = jnp.asarray(packed_segment_ids(b, t, args.documents, rng))
    mask = attention_mask(segment_ids)

    f32 = [x.astype(jnp.float32) for x in (q, k, v, grad)]
    ref_out, ref_grads = fwd_bwd(lambda q, k, v: xla_attention(q, k, v, mask))(*f32)

    def packed(q, k, v, max_documents: int):
        return cudnn_attention(q, k, v, document_spans(segment_ids, max_documents))

    def packed_with_mask_type(q, k, v, mask_type: str):
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        offsets, lengths = document_spans(segment_ids, 8)
        return cudnn.dot_product_attention(
            q,
            k,
            v,
            q_seqlen=lengths,
            kv_seqlen=lengths,
            q_offsets=offsets,
            kv_offsets=offsets,
            scale=d**-0.5,
            mask_type=getattr(cudnn.MaskType, mask_type),
            qkv_layout="BTNH",
        )

    implementations: dict[str, Callable] = {
        "xla": lambda q, k, v: xla_attention(q, k, v, mask),
        **{f"cudnn_packed_max{m}": functools.partial(packed, max_documents=m) for m in args.max_documents},
        "cudnn_mask": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation="cudnn"
        ),
        "cudnn_packed_causal_type": lambda q, k, v: packed_with_mask_type(q, k, v, "CAUSAL"),
        "cudnn_causal": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        ),
    }
    # Causal attention: 2·2·b·h·t²·d/2 multiply-adds forward, 2.5× that backward (dq, dk, dv, and
    # the recomputed scores): the FLOPs a flash kernel does.
    flops = 3.5 * 2 * b * h * t * t * d
    for name, attend in implementations.items():
        figures: dict = {"implementation": name, "shape": [b, t, h, kv, d], "documents": args.documents}
        try:
            fn = fwd_bwd(attend)
            out, grads = fn(q, k, v, grad)
            figures["out_error"] = relative_error(out, ref_out)
            figures["grad_errors"] = [relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True)]
            seconds = median_seconds(fn, (q, k, v, grad), args.iters)
            figures["fwd_bwd_ms"] = seconds * 1e3
            figures["tflops"] = flops / seconds / 1e12
        except Exception as error:  # a kernel this device or version lacks: report, go on
            figures["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
