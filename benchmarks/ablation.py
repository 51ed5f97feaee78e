"""Single-neuron ablation sweeps (`actdb ablate --each`): one full forward pass per neuron (the naive way)
against the shared-prefix sweep (clean pass once per batch, then only the layers above each neuron's layer),
with 1 and with G variants stacked per call, on the same model and tokens.

    .venv/bin/python benchmarks/ablation.py [--layers 4] [--d-model 256] [--d-mlp 1024] [--neurons 64]

Uses a randomly initialised GPT-2 (vocab 2000); neurons are drawn evenly from all layers.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actdb.compute.ablation.loss import LossEvaluator, set_edits
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.zoo import save_tiny_model, stdlib_texts, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--neurons", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--variants", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actdb-ablation-bench-"))
    tok = train_tokenizer(stdlib_texts(max_files=20), 2000, root / "tok")
    src = save_tiny_model(
        "gpt2", root / "m", tok, n_layers=args.layers, d_model=args.d_model, d_mlp=args.d_mlp, n_ctx=args.seq_len
    )
    model = load_model(str(src), None, torch.device("cpu"))
    rng = np.random.default_rng(0)
    n_seq = args.tokens // args.seq_len
    tokens = rng.integers(0, 2000, (n_seq, args.seq_len)).astype(np.int32)
    ev = LossEvaluator(model, tokens, np.ones_like(tokens, dtype=bool), batch_size=8)
    picks = rng.choice(args.layers * args.d_mlp, args.neurons, replace=False)
    neurons = sorted((int(i % args.layers), int(i // args.layers)) for i in picks)
    t0 = time.perf_counter()
    ev.loss()
    clean_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for n in neurons:
        ev.loss(set_edits([n], "zero", {}))
    single_s = time.perf_counter() - t0
    timings = {}
    for variants in (1, args.variants):
        t0 = time.perf_counter()
        ev.single_neuron_losses(neurons, "zero", {}, variants)
        timings[variants] = time.perf_counter() - t0
    per_pass = args.tokens / args.seq_len / 8
    print(
        f"{args.neurons} single-neuron ablations, GPT-2 {args.layers} layers x {args.d_mlp} (d_model {args.d_model}), "
        f"{args.tokens} tokens in batches of 8 x {args.seq_len}"
    )
    print(f"clean pass: {clean_s:.2f}s ({per_pass / clean_s:.1f} forward calls/s)")
    print(f"one full forward pass per neuron: {single_s:.1f}s ({args.neurons / single_s:.1f} ablations/s)")
    for variants, seconds in timings.items():
        print(
            f"shared prefix, {variants} variant(s) per call: {seconds:.1f}s ({args.neurons / seconds:.1f} ablations/s, "
            f"{single_s / seconds:.2f}x the naive way)"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
