"""Interventional robustness (`actdb robustness run`): the per-seed forward passes with and without an intervention,
reduced to IR, KL, loss change and flips (`score_batch`), against two bare batched forward passes per seed on the
same contexts (the least any such measurement must run); the share of the dispersion measures (JSD over the
vocabulary, KL, flips); and peak memory at N and 4N contexts (it must not grow with the number of contexts).

    .venv/bin/python benchmarks/robustness.py [--seeds 4] [--contexts 32] [--vocab 4000] [--seq-len 128] \
        [--layers 2] [--d-model 128] [--d-mlp 512]

Uses randomly initialised GPT-2 seeds (default 2 layers, d_model 128, d_mlp 512); the intervention zero-ablates 16
neurons of layer 1 in every seed.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actdb.compute.ablation.loss import set_edits
from actdb.compute.robustness.forward import Timing, Variant, VariantTally, score_batch
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.zoo import save_tiny_model, stdlib_texts, train_tokenizer


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bare(models, batches) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            for m in models:
                for _ in range(2):
                    _ = m(input_ids=ids, use_cache=False).logits
    return time.perf_counter() - t0


def _ours(models, batches, edits, topk) -> tuple[float, Timing]:
    timing = Timing()
    tally = [VariantTally(len(models))]
    t0 = time.perf_counter()
    for ids in batches:
        ev = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
        score_batch(models, ids, [Variant(ids, ev, edits)], tally, topk, timing)
    return time.perf_counter() - t0, timing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-mlp", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="actdb-robustness-bench-"))
    tok = train_tokenizer(stdlib_texts(max_files=40), args.vocab, root / "tok")
    models = []
    for k in range(args.seeds):
        src = save_tiny_model(
            "gpt2",
            root / f"m{k}",
            tok,
            seed=k,
            n_layers=args.layers,
            d_model=args.d_model,
            d_mlp=args.d_mlp,
            n_ctx=args.seq_len,
        )
        models.append(load_model(str(src), None, torch.device("cpu")))
    vocab = models[0].config.vocab_size
    rng = np.random.default_rng(0)

    def batches(n_contexts: int) -> list[torch.Tensor]:
        tokens = torch.from_numpy(rng.integers(0, vocab, (n_contexts, args.seq_len)))
        return list(tokens.split(args.batch_size))

    edits = [set_edits([(1, n) for n in range(16)], "zero", {}) for _ in models]
    small = batches(args.contexts)
    _bare(models, small[:1])
    _ours(models, small[:1], edits, None)  # warm-up
    bare = min(_bare(models, small) for _ in range(args.repeats))
    runs = [_ours(models, small, edits, None) for _ in range(args.repeats)]
    ours, timing = min(runs, key=lambda r: r[0])
    topk, _ = min((_ours(models, small, edits, 50) for _ in range(args.repeats)), key=lambda r: r[0])
    peak_small = _peak_mib()
    _ours(models, batches(4 * args.contexts), edits, None)
    peak_large = _peak_mib()
    print(
        f"GPT-2 {args.layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}; "
        f"{args.seeds} seeds, {args.contexts} contexts x {args.seq_len} tokens, vocab {vocab}, batch "
        f"{args.batch_size}, best of {args.repeats}, {torch.get_num_threads()} threads"
    )
    print(f"two bare batched forward passes per seed:       {bare:7.3f} s")
    print(f"clean + intervened passes and every measure:    {ours:7.3f} s  ratio {ours / bare:.2f} (target <= 1.25)")
    print(
        f"  of which forward passes {timing.forward:.3f} s, measures (JSD, KL, CE, flips) {timing.measures:.3f} s "
        f"= {timing.measures / ours:.0%} of the run"
    )
    print(f"with --top-k 50:                                {topk:7.3f} s  ratio {topk / bare:.2f}")
    print(
        f"peak RSS: {peak_small:.0f} MiB after {args.contexts} contexts, {peak_large:.0f} MiB after "
        f"{4 * args.contexts} contexts (+{peak_large - peak_small:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
