"""`actdb plan`'s estimate of one correlation step against the engine's measured time on the same shapes, in the
same run: the 200k-token benchmark's shape (3 sets x 4 layers x 1024 neurons) and the demo's (4 sets x 2 layers x
512 neurons x 24,576 tokens), on synthetic float16 sets written to disk first.

    .venv/bin/python benchmarks/planner_accuracy.py [--repeats 2] [--agreement-only]

The planner measures this machine's rates itself (about two seconds); the engine run is the best of `--repeats`.
First, `actdb plan` for the published study runs twice as a user runs it (a subprocess each, imports included):
its wall time, and how far the two runs' estimates are apart (the planner's rates must not depend on how busy
the machine is).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
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


PLANS = (
    "--models 5 --steps 5 --tokens 5M --arch gpt2-small --device h100 --workers 8",  # the published study
    "--models 4 --steps 1 --tokens 24576 --layers 2 --d-mlp 512 --params 1M --device cpu",  # the demo step here
)
COMPARED = ("correlation time in total", "research method time", "product rate", "reading rate", "other rates")


def agreement(command: str, runs: int) -> None:
    """`actdb plan` `runs` times as a user runs it: wall time each, and the spread of its estimates."""
    actdb = Path(sys.executable).with_name("actdb")
    results = []
    for _ in range(runs):
        started = time.perf_counter()
        argv = [str(actdb), "plan", *command.split(), "--format", "json"]
        out = subprocess.run(argv, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        rows = {r["quantity"]: r["value"] for r in json.loads(out.stdout)}
        results.append((wall, rows))
    print(f"actdb plan {command} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    for wall, rows in results:
        print(f"  wall {wall:.2f} s; " + "; ".join(f"{k} {rows[k]:.4g}" for k in COMPARED))
    for k in COMPARED:
        values = [rows[k] for _w, rows in results]
        print(f"  {k}: largest / smallest {max(values) / min(values):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--agreement-runs", type=int, default=3)
    ap.add_argument("--agreement-only", action="store_true")
    args = ap.parse_args()
    for command in PLANS:
        agreement(command, args.agreement_runs)
    if args.agreement_only:
        return
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
