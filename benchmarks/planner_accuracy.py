"""`actdb plan`'s estimate of one correlation step against the engine's measured time on the same shapes, in the
same run: the 200k-token benchmark's shape (3 sets x 4 layers x 1024 neurons) and the demo's (4 sets x 2 layers x
512 neurons x 24,576 tokens), on synthetic float16 sets written to disk first.

    .venv/bin/python benchmarks/planner_accuracy.py [--repeats 2]

The planner measures this machine's rates itself (a few seconds); the engine run is the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets

from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.compute.planning.estimate import plan_study
from actdb.compute.planning.shapes import PlanRequest, custom_architecture
from actdb.store.device import resolve_device

SHAPES = {  # name: (sets, layers, d_mlp, tokens)
    "200k benchmark": (3, 4, 1024, 200_192),
    "demo step": (4, 2, 512, 24_576),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cpu = resolve_device("cpu").array
    for name, (n_sets, layers, d_mlp, tokens) in SHAPES.items():
        root = Path(tempfile.mkdtemp(prefix="actdb-planner-"))
        sets = write_sets(root, n_sets, layers, d_mlp, tokens)
        ids = np.zeros((tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
        mask = np.ones_like(ids, dtype=bool)
        arch = custom_architecture(layers, d_mlp, params=1)
        plan = plan_study(PlanRequest(arch=arch, models=n_sets, steps=1, tokens=tokens))
        measured = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = correlate_sets(sets, ids, mask, CorrelationOptions(), cpu)
            measured.append(time.perf_counter() - started)
        best = min(measured)
        t = plan.step
        print(
            f"{name}: {n_sets} sets x {layers} x {d_mlp} x {tokens:,} tokens, {result.n_passes} pass(es): planner "
            f"{t.total:.2f} s (products {t.products:.2f}, reading {t.stream + t.read:.2f}, baseline {t.baseline:.2f}, "
            f"QRs {t.host:.2f}), engine {best:.2f} s (runs {', '.join(f'{m:.2f}' for m in measured)}; phases "
            f"{', '.join(f'{k} {v:.2f}' for k, v in result.seconds.items())}); estimate / measured "
            f"{t.total / best:.2f}; peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        )


if __name__ == "__main__":
    main()
