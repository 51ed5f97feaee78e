"""Single-neuron ablation sweep: batched variants (one forward call evaluates G neurons) against one forward
call per neuron, on the same model and tokens, plus the clean forward pass rate.

    .venv/bin/python benchmarks/ablation.py [--neurons 64] [--tokens 4096] [--variants 16]

Uses a randomly initialised GPT-2 as wide as the demo zoo (2 layers x 512 neurons, d_model 128, vocab 2000).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute.ablation import LossEvaluator, set_edits, single_neuron_edits  # noqa: E402
from store.model_loading import load_model  # noqa: E402
from store.zoo import save_tiny_model, stdlib_texts, train_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--neurons", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--variants", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actdb-ablation-bench-"))
    tok = train_tokenizer(stdlib_texts(max_files=20), 2000, root / "tok")
    src = save_tiny_model("gpt2", root / "m", tok, d_model=128, d_mlp=512, n_ctx=args.seq_len)
    model = load_model(str(src), None, torch.device("cpu"))
    rng = np.random.default_rng(0)
    n_seq = args.tokens // args.seq_len
    tokens = rng.integers(0, 2000, (n_seq, args.seq_len)).astype(np.int32)
    ev = LossEvaluator(model, tokens, np.ones_like(tokens, dtype=bool), batch_size=8)
    neurons = [(int(i % 2), int(i // 2)) for i in rng.choice(1024, args.neurons, replace=False)]
    t0 = time.perf_counter()
    ev.loss()
    clean_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for n in neurons:
        ev.loss(set_edits([n], "zero", {}))
    single_s = time.perf_counter() - t0
    before = ev.forward_passes
    t0 = time.perf_counter()
    for g in range(0, len(neurons), args.variants):
        group = neurons[g : g + args.variants]
        ev.losses_for_variants(len(group), single_neuron_edits(group, "zero", {}))
    batched_s = time.perf_counter() - t0
    calls = ev.forward_passes - before
    per_pass = args.tokens / args.seq_len / 8
    print(f"{args.neurons} single-neuron ablations on {args.tokens} tokens (batches of 8 x {args.seq_len})")
    print(f"clean pass: {clean_s:.2f}s ({per_pass / clean_s:.1f} forward calls/s)")
    print(f"one call per neuron: {single_s:.1f}s ({args.neurons / single_s:.1f} ablations/s)")
    print(
        f"batched, {args.variants} variants per call: {batched_s:.1f}s ({args.neurons / batched_s:.1f} ablations/s,"
        f" {calls} forward calls of {args.variants}x the batch)"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"speed-up: {single_s / batched_s:.2f}x; peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
