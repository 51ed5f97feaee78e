"""Ingest throughput against a bare forward pass of the same model on the same batches, and peak RSS.

    .venv/bin/python benchmarks/ingest.py [--layers 4] [--d-model 768] [--d-mlp 3072] [--tokens 65536]

Builds a randomly initialised GPT-2 as wide as GPT-2 small's MLP, a token dataset from standard-library
source, times `model.base_model(ids)` with no hooks (the baseline), then `actdb ingest` of the same batches
(hooks + float16 copy + writer thread + HDF5 + streaming statistics). Run it at two token counts to see that
peak RSS does not grow with the number of tokens.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actdb.store.config import StoreConfig
from actdb.store.database import Store
from actdb.store.dataset_registry import add_dataset
from actdb.store.ingest import IngestRequest, ingest
from actdb.store.model_loading import load_model
from actdb.store.token_file import TokenDataset
from actdb.store.zoo import save_tiny_model, stdlib_files, stdlib_texts, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-mlp", type=int, default=3072)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actdb-ingest-bench-"))
    tok = train_tokenizer(stdlib_texts(max_files=40), 1000, root / "tok")
    src = save_tiny_model(
        "gpt2", root / "model", tok, n_layers=args.layers, d_model=args.d_model, d_mlp=args.d_mlp, n_ctx=args.seq_len
    )
    store = Store.init(StoreConfig.resolve(root / "store"))
    add_dataset(store, "bench", [str(p) for p in stdlib_files()], str(tok), args.seq_len, args.tokens, seed=0)
    ds = TokenDataset.load(store.config.file(store.config.dataset_path("bench")))
    n_tokens = ds.tokens.size
    req = IngestRequest(
        "bench", 0, "bench", source=str(src), device=args.device, batch_size=args.batch_size, progress=False
    )
    model = load_model(str(src), None, torch.device("cuda" if args.device == "cuda" else "cpu"))
    device = next(model.parameters()).device
    with torch.inference_mode():
        model.base_model(input_ids=torch.from_numpy(ds.tokens[:1].astype(np.int64)).to(device))
        t0 = time.perf_counter()
        for s0 in range(0, ds.n_sequences, args.batch_size):
            model.base_model(
                input_ids=torch.from_numpy(ds.tokens[s0 : s0 + args.batch_size].astype(np.int64)).to(device),
                use_cache=False,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        bare_s = time.perf_counter() - t0
    del model
    result = ingest(store, req, log=lambda _m: None)
    bare_tps, ingest_tps = n_tokens / bare_s, n_tokens / result.seconds
    neurons = args.layers * args.d_mlp
    print(
        f"model: {args.layers} layers x {args.d_mlp} neurons (d_model {args.d_model}); {n_tokens} tokens, "
        f"batch {args.batch_size} x {args.seq_len}; torch threads {torch.get_num_threads()}"
    )
    print(f"bare forward: {bare_tps:,.0f} tokens/s ({bare_s:.1f}s)")
    print(
        f"actdb ingest: {ingest_tps:,.0f} tokens/s ({result.seconds:.1f}s, {result.bytes / 1e6:.0f} MB written, "
        f"{n_tokens * neurons * 2 / result.seconds / 1e6:.0f} MB/s)"
    )
    print(f"ratio ingest / bare forward: {ingest_tps / bare_tps:.2f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
