"""Cost of the streaming top-K tracker next to the per-neuron moments that ingest already computes per batch.

    .venv/bin/python benchmarks/topk_tracker.py [--chunks 24] [--layers 4] [--rows 4096] [--d-mlp 3072] [--k 32]

Feeds the same float16 chunks (ingest's batch of 8 x 512 tokens at GPT-2 small's MLP width) to
`TopKTracker.update` and `StreamingMoments.update` for every layer and prints, per layer and chunk, the
tracker's first-chunk cost (every row is a candidate), its steady-state median, the moments' median, and the
ratio of the totals.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from actdb.store.ingest.neuron_stats import StreamingMoments, Workspace
from actdb.store.ingest.top_activations import TopKTracker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--d-mlp", type=int, default=3072)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tracker = TopKTracker(args.layers, args.d_mlp, args.k)
    workspace = Workspace()
    moments = [StreamingMoments(args.d_mlp, workspace) for _ in range(args.layers)]
    # GELU-like activations with a per-neuron scale, fresh each chunk (drawn outside the timed part)
    scale = rng.gamma(2.0, 0.5, size=args.d_mlp).astype(np.float32)
    track, stats = [], []
    for c in range(args.chunks):
        z = rng.standard_normal((args.rows, args.d_mlp), dtype=np.float32) * scale
        x = (z * 0.5 * (1.0 + np.tanh(0.7978845608 * (z + 0.044715 * z**3)))).astype(np.float16)
        positions = np.arange(c * args.rows, (c + 1) * args.rows, dtype=np.int64)
        t0 = time.perf_counter()
        for layer in range(args.layers):
            tracker.update(layer, x, positions)
        t1 = time.perf_counter()
        for m in moments:
            m.update(x)
        t2 = time.perf_counter()
        track.append((t1 - t0) / args.layers)
        stats.append((t2 - t1) / args.layers)
    tracker.result()
    ms = 1000.0
    print(f"{args.chunks} chunks of {args.rows} x {args.d_mlp} float16, {args.layers} layers, k={args.k}")
    print(f"tracker: first chunk {track[0] * ms:.1f} ms/layer, then median {np.median(track[1:]) * ms:.1f} ms/layer")
    print(f"moments: median {np.median(stats) * ms:.1f} ms/layer")
    print(
        f"ratio tracker/moments: {sum(track) / sum(stats):.3f} over all chunks, "
        f"{np.median(track[1:]) / np.median(stats):.3f} steady state"
    )


if __name__ == "__main__":
    main()
