"""How much do universal-neuron labels depend on the baseline's random rotations? On a copy of a store (the
demo's, by default), correlate one step twice with different `--seed`s, at K = 1 and at K baseline draws, and
print the Jaccard overlap of the two universal sets at the threshold, plus the extra time of K draws.

    .venv/bin/python benchmarks/label_stability.py [--home actdb-demo] [--step 800] [--threshold 0.2] [--draws 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from actdb.compute.correlation.run import CorrelationRequest, correlate
from actdb.query.queries import universal_neurons
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.refs import SetRef


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="actdb-demo")
    ap.add_argument("--step", type=int, default=800)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--models", default="seed0,seed1,seed2,seed3")
    args = ap.parse_args()
    copy = Path(tempfile.mkdtemp(prefix="actdb-stability-")) / "store"
    shutil.copytree(args.home, copy, ignore=shutil.ignore_patterns("zoo", "report"))
    store = Store.open(StoreConfig.resolve(copy, None))
    sets = [SetRef(m, args.step) for m in args.models.split(",")]
    labels, stable, seconds = {}, {}, {}
    for draws in (1, args.draws):
        for seed in (101, 202):
            request = CorrelationRequest(sets=sets, seed=seed, baseline_draws=draws, progress=False)
            t0 = time.perf_counter()
            outcome = correlate(store, request, log=lambda _m: None)
            seconds[(draws, seed)] = time.perf_counter() - t0
            rows = universal_neurons(store, run=outcome.run_id, threshold=args.threshold)
            labels[(draws, seed)] = {(r["model"], r["layer"], r["neuron"]) for r in rows}
            stable[(draws, seed)] = {(r["model"], r["layer"], r["neuron"]) for r in rows if r["stability"] >= 0.9}
    for draws in (1, args.draws):
        a, b = labels[(draws, 101)], labels[(draws, 202)]
        print(
            f"K = {draws}: universal sets at excess > {args.threshold} from seeds 101 and 202: {len(a)} and "
            f"{len(b)} neurons, Jaccard {_jaccard(a, b):.3f}; correlate {seconds[(draws, 101)]:.1f}s"
        )
    a, b = stable[(args.draws, 101)], stable[(args.draws, 202)]
    print(f"K = {args.draws}, stability >= 0.9 only: {len(a)} and {len(b)} neurons, Jaccard {_jaccard(a, b):.3f}")
    store.close()
    shutil.rmtree(copy.parent)


if __name__ == "__main__":
    main()
