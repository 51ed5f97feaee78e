"""Ingest throughput against a bare forward pass of the same model on the same batches, and peak RSS.

    .venv/bin/python benchmarks/ingest.py [--layers 4] [--d-model 768] [--d-mlp 3072] [--tokens 65536]

Builds a randomly initialised GPT-2 as wide as GPT-2 small's MLP, a token dataset from standard-library
source, times `model.base_model(ids)` with no hooks (the baseline), then `actdb ingest` of the same batches
(hooks + float16 copy + writer thread + HDF5 + streaming statistics), once without the top-K examples
(`--top-k 0`) and once with them (the default 32), and then the explanation of that set. Run it at two token
counts to see that peak RSS does not grow with the number of tokens.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actdb.compute.explain.run import explain_set
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.database.schema import ActivationSet
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.dataset_registry import add_dataset
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.pipeline import IngestRequest, ingest
from actdb.store.ingest.zoo import save_tiny_model, stdlib_files, stdlib_texts, train_tokenizer


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
    runs = {}
    for top_k in (0, 32):  # without and with the streaming top-K examples (two models, so neither is a no-op)
        req = IngestRequest(
            model=f"bench{top_k}",
            step=0,
            dataset="bench",
            source=str(src),
            device=args.device,
            batch_size=args.batch_size,
            top_k=top_k,
            identical_weights=True,  # the same weights under a second name, on purpose
            progress=False,
        )
        runs[top_k] = ingest(store, req, log=lambda _m: None)
    with store.session() as s:
        aset = s.get(ActivationSet, runs[32].set_id)
    t0 = time.perf_counter()
    explain_set(store, aset, examples=runs[32].examples, model=runs[32].model, progress=False, log=lambda _m: None)
    explain_s = time.perf_counter() - t0
    bare_tps = n_tokens / bare_s
    neurons = args.layers * args.d_mlp
    print(
        f"model: {args.layers} layers x {args.d_mlp} neurons (d_model {args.d_model}); {n_tokens} tokens, "
        f"batch {args.batch_size} x {args.seq_len}; torch threads {torch.get_num_threads()}"
    )
    print(f"bare forward: {bare_tps:,.0f} tokens/s ({bare_s:.1f}s)")
    for top_k, result in runs.items():
        tps = n_tokens / result.seconds
        print(
            f"actdb ingest --top-k {top_k}: {tps:,.0f} tokens/s ({result.seconds:.1f}s, {result.bytes / 1e6:.0f} MB "
            f"written, {n_tokens * neurons * 2 / result.seconds / 1e6:.0f} MB/s); ratio to bare forward "
            f"{tps / bare_tps:.2f}"
        )
    print(f"top-K tracker: ingest with it takes {runs[32].seconds / runs[0].seconds:.3f}x the time without it")
    print(
        f"explaining the set afterwards (token/position pass over the file, vocabulary statistics): {explain_s:.1f}s "
        f"= {explain_s / runs[32].seconds:.2f} of its ingest"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
