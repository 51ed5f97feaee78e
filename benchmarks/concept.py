"""Concept experts (`actdb concept run`): the sentence pass against a bare batched forward pass over the same
sentences (same batches, same padding), the vectorised AP/AUROC rate, and peak memory of the scoring as the
number of concepts grows.

    .venv/bin/python benchmarks/concept.py [--layers 4] [--d-model 256] [--d-mlp 1024] [--neurons 50000]

The sentences are the demo's concepts file (Python constructs from held-out standard-library files); the model is
a randomly initialised GPT-2 (vocab 2000). `--device cuda` runs the passes on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from actdb.compute.concepts import math as cm
from actdb.compute.concepts.concept_file import ConceptSet, parse_concepts, sentences_of
from actdb.compute.concepts.python_concepts import python_concepts
from actdb.compute.concepts.run import ConceptRequest, Responses, encode_sentence, score_all, sentence_responses
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.token_datasets import load_tokenizer
from actdb.store.ingest.zoo import save_tiny_model, stdlib_files, stdlib_texts, train_tokenizer


def bare_pass(model, tokenizer, texts: list[str], batch_size: int, device: torch.device) -> None:
    """The same batches as `sentence_responses`, without hooks or pooling."""
    encoded = [encode_sentence(tokenizer, t) for t in texts]
    order = np.argsort([len(e) for e in encoded], kind="stable")
    pad = tokenizer.pad_token_id or 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                attention[r, : len(encoded[i])] = 1
            model(input_ids=ids.to(device), attention_mask=attention.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--neurons", type=int, default=50000, help="Neurons of the synthetic AP benchmark.")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="actdb-concept-bench-"))
    tok_dir = train_tokenizer(stdlib_texts(max_files=20), 2000, root / "tok")
    src = save_tiny_model(
        "gpt2", root / "m", tok_dir, n_layers=args.layers, d_model=args.d_model, d_mlp=args.d_mlp, n_ctx=128
    )
    model = load_model(str(src), None, device)
    tokenizer = load_tokenizer(str(src))
    concepts = parse_concepts("\n".join(json.dumps(x) for x in python_concepts(stdlib_files()[150:])))
    sentences = sentences_of(concepts, 0)
    n_tok = sum(len(encode_sentence(tokenizer, t)) for t in sentences.texts)
    print(f"{len(sentences.texts)} sentences ({n_tok} tokens), {len(concepts.concepts)} concepts, {args.device}")
    print(f"model: GPT-2 {args.layers} layers x d_mlp {args.d_mlp} ({args.layers * args.d_mlp} neurons)")

    def ours() -> None:
        sentence_responses(model, tokenizer, sentences, concepts, "mlp.post", "max", False, args.batch_size, device)

    bare_pass(model, tokenizer, sentences.texts, args.batch_size, device)  # warm-up
    ours()
    # interleaved repeats: both see the same machine load
    bare_t, ours_t = [], []
    for _ in range(args.repeats):
        bare_t.append(best_of(1, lambda: bare_pass(model, tokenizer, sentences.texts, args.batch_size, device)))
        ours_t.append(best_of(1, ours))
    bare, mine = min(bare_t), min(ours_t)
    print(
        f"sentence pass: bare forward {bare:.3f}s, with hooks + masked max pooling {mine:.3f}s: "
        f"ratio {bare / mine:.2f} of the bare pass's rate (best of {args.repeats}, interleaved)"
    )

    rng = np.random.default_rng(0)
    n_sent, n = 48, args.neurons
    x = rng.normal(size=(n_sent, n)).astype(np.float32)
    t_sort = best_of(args.repeats, lambda: cm.score_concept(x, 24, k=100, n_permutations=0, rng=rng))
    t_perm = best_of(args.repeats, lambda: cm.score_concept(x, 24, k=100, n_permutations=20, rng=rng))
    print(
        f"AP+AUROC of {n:,} neurons x {n_sent} sentences: {t_sort:.3f}s ({n * n_sent / t_sort / 1e6:.1f} M "
        f"neuron-sentences/s; one sort per column); with 20 permutations {t_perm:.3f}s "
        f"({(t_perm - t_sort) / 20 * 1e3:.1f} ms per permutation, no re-sort)"
    )

    n_layers, d_mlp = 4, n // 4
    print("peak memory of score_all (tracemalloc) vs number of concepts, beside its AP + AUROC arrays:")
    for n_concepts in (4, 8, 16, 32):
        lines = [{"concept": f"c{c}", "positive": [f"s{c}_{i}" for i in range(24)]} for c in range(n_concepts)]
        cs: ConceptSet = parse_concepts("\n".join(json.dumps(x) for x in lines))
        sent = sentences_of(cs, 0)
        responses = Responses(rng.normal(size=(len(sent.texts), n_layers * d_mlp)).astype(np.float32), {}, 0)
        req = ConceptRequest(name="bench", sets="x@0", permutations=5, mantel_permutations=100)
        tracemalloc.start()
        score_all(responses, sent, cs, req, n_layers, d_mlp, None)
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        arrays = 2 * n_concepts * n_layers * d_mlp * 4
        print(
            f"  {n_concepts:3d} concepts: peak {peak / 2**20:7.1f} MiB, AP+AUROC arrays {arrays / 2**20:6.1f} MiB, "
            f"the rest {(peak - arrays) / 2**20:6.1f} MiB"
        )


if __name__ == "__main__":
    main()
