"""Query latency at paper scale: 5 models x 5 steps x 36,864 neurons with 4 matches each, generated rows.

    .venv/bin/python benchmarks/query.py [--db postgresql://postgres@127.0.0.1:5432/postgres] [--neurons 3072]
    .venv/bin/python benchmarks/query.py --store actdb-demo --set seed0@800 --neuron 0.244   # an existing store

Fills a fresh store (SQLite file by default; with --db a fresh PostgreSQL database is created next to the
given one), then times `actdb universal --model M --step N --layer L` and `actdb neuron M@N L.N` through the
same query functions the CLI calls, and prints the EXPLAIN plan of the universal query. Then the wall time of
whole `actdb` processes (`universal`, `runs`, `status`, `sql`, `neuron`, `families`; median of --repeats)
beside `python -c "import sqlalchemy"` measured in the same run, the floor every command that reads SQL pays.
With --store, only the wall times, on that store.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import insert, text

from actdb.query.queries import neuron_story, universal_neurons
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.database.schema import (
    ActivationSet,
    Checkpoint,
    CorrelationRun,
    Dataset,
    Model,
    NeuronExplanation,
    NeuronMatch,
    NeuronStat,
    RunMember,
    SetExplanation,
    Universality,
)

MODELS, STEPS, LAYERS = 5, 5, 12


def fill(store: Store, d_mlp: int) -> None:
    rng = np.random.default_rng(0)
    n = LAYERS * d_mlp
    layer, neuron = np.divmod(np.arange(n), d_mlp)
    with store.session() as s:
        s.add(
            Dataset(
                id=1,
                name="pile",
                tokenizer="gpt2",
                tokenizer_fingerprint="f",
                fingerprint="f",
                vocab_size=50257,
                seq_len=512,
                n_sequences=10,
                n_tokens=5120,
                n_counted=5000,
                token_sha256="x",
                source="gen",
                seed=0,
                path="-",
            )
        )
        for m in range(MODELS):
            s.add(
                Model(
                    id=m + 1,
                    name=f"m{m}",
                    family="gpt2",
                    architecture="gpt2",
                    n_layers=LAYERS,
                    d_mlp=d_mlp,
                    source="gen",
                )
            )
        s.flush()
        for m in range(MODELS):
            for k in range(STEPS):
                cid = m * STEPS + k + 1
                s.add(Checkpoint(id=cid, model_id=m + 1, step=k * 100000, source="gen"))
                s.flush()
                s.add(
                    ActivationSet(
                        id=cid,
                        checkpoint_id=cid,
                        dataset_id=1,
                        hook="mlp.post",
                        dtype="float16",
                        path="-",
                        status="complete",
                        tokens_done=5120,
                        n_tokens=5120,
                    )
                )
        for k in range(STEPS):
            s.add(
                CorrelationRun(
                    id=k + 1,
                    request_key=f"k{k}",
                    dataset_id=1,
                    kind="cross_model",
                    control="none",
                    threshold=0.5,
                    baseline_seed=0,
                    topk=0,
                    backend="numpy",
                    status="complete",
                )
            )
            s.flush()
            for m in range(MODELS):
                s.add(RunMember(run_id=k + 1, set_id=m * STEPS + k + 1, position=m))
    batch = 50000
    for k in range(STEPS):
        for m in range(MODELS):
            sid = m * STEPS + k + 1
            mx = rng.uniform(0.1, 0.95, (MODELS - 1, n))
            base = rng.uniform(0.1, 0.3, (MODELS - 1, n))
            stats = [
                {
                    "set_id": sid,
                    "layer": int(layer[i]),
                    "neuron": int(neuron[i]),
                    "count": 5000,
                    "mean": 0.1,
                    "std": 1.0,
                    "skew": 0.5,
                    "kurtosis": 3.0,
                    "frac_active": 0.2,
                    "min": -0.17,
                    "max": 5.0,
                }
                for i in range(n)
            ]
            univ = [
                {
                    "run_id": k + 1,
                    "set_id": sid,
                    "layer": int(layer[i]),
                    "neuron": int(neuron[i]),
                    "mean_max_corr": float(mx[:, i].mean()),
                    "min_max_corr": float(mx[:, i].min()),
                    "mean_baseline": float(base[:, i].mean()),
                    "excess_corr": float((mx[:, i] - base[:, i]).mean()),
                    "is_dead": False,
                }
                for i in range(n)
            ]
            others = [o * STEPS + k + 1 for o in range(MODELS) if o != m]
            matches = [
                {
                    "run_id": k + 1,
                    "set_id": sid,
                    "other_set_id": o,
                    "layer": int(layer[i]),
                    "neuron": int(neuron[i]),
                    "max_corr": float(mx[j, i]),
                    "best_layer": int(layer[i]),
                    "best_neuron": int(neuron[i]),
                    "baseline_max_corr": float(base[j, i]),
                }
                for j, o in enumerate(others)
                for i in range(n)
            ]
            explained = [
                {
                    "set_id": sid,
                    "layer": int(layer[i]),
                    "neuron": int(neuron[i]),
                    "token_r2": float(rng.uniform()),
                    "position_r2": float(rng.uniform(0, 0.2)),
                    "top_token": int(rng.integers(50257)),
                    "vocab_skew": 0.1,
                    "vocab_kurtosis": 3.0,
                }
                for i in range(n)
            ]
            with store.session() as s:
                s.add(
                    SetExplanation(
                        set_id=sid,
                        path="-",
                        top_k=0,
                        min_count=1,
                        n_tokens=5120,
                        n_token_ids=1000,
                        n_positions=512,
                        token_min_r2=0.5,
                        position_min_r2=0.5,
                    )
                )
                tables = (
                    (NeuronStat, stats),
                    (Universality, univ),
                    (NeuronMatch, matches),
                    (NeuronExplanation, explained),
                )
                for table, rows in tables:
                    for b in range(0, len(rows), batch):
                        s.execute(insert(table), rows[b : b + batch])
        print(f"  filled step {k + 1}/{STEPS}", flush=True)


def timed(fn, repeats: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def _wall(argv: list[str], repeats: int) -> tuple[float, int]:
    """Median wall seconds of a whole process over `repeats` runs (after one warm-up), and its exit status."""
    subprocess.run(argv, capture_output=True)
    samples, code = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        code = subprocess.run(argv, capture_output=True).returncode
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), code


def cli_walls(home: Path, url: str, target: str, neuron: str, repeats: int) -> None:
    """The read commands as a user runs them, beside the bare `import sqlalchemy` in the same run."""
    base = [sys.executable, "-m", "actdb.query.cli", "--home", str(home), "--db", url]
    model = target.split("@")[0]
    commands = {
        "universal": ["universal", "--model", model, "--limit", "20"],
        "runs": ["runs"],
        "status": ["status"],
        "sql": ["sql", "SELECT count(*) FROM v_universality"],
        "neuron": ["neuron", target, neuron],
        "families": ["families", target],
    }
    floor, _ = _wall([sys.executable, "-c", "import sqlalchemy"], repeats)
    print(f"wall time, median of {repeats} (python -c 'import sqlalchemy': {floor:.3f} s in this run):")
    for args in commands.values():
        wall, code = _wall(base + args, repeats)
        note = "" if code == 0 else f"  (exit {code})"
        print(f"  actdb {' '.join(args):<52} {wall:.3f} s  ({wall / floor:.2f}x import sqlalchemy){note}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", help="PostgreSQL admin URL; a fresh database is created and dropped")
    ap.add_argument("--neurons", type=int, default=3072, help="neurons per layer (3072 = GPT-2 small)")
    ap.add_argument("--store", type=Path, help="time the CLI on this existing store (its SQLite file) only")
    ap.add_argument("--set", default="m2@300000", help="MODEL@STEP for `neuron` and `families`")
    ap.add_argument("--neuron", default="5.1234", help="L.N for `neuron`")
    ap.add_argument("--repeats", type=int, default=7, help="runs per command (median)")
    args = ap.parse_args()
    if args.store is not None:
        cli_walls(args.store, f"sqlite:///{args.store / 'actdb.sqlite'}", args.set, args.neuron, args.repeats)
        return
    home = Path(tempfile.mkdtemp(prefix="actdb-query-bench-"))
    admin, name = None, None
    if args.db:
        import psycopg

        admin = psycopg.connect(args.db.replace("postgresql+psycopg", "postgresql"), autocommit=True)
        name = f"actdb_bench_{uuid.uuid4().hex[:8]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        url = f"{args.db.rsplit('/', 1)[0]}/{name}"
    else:
        url = f"sqlite:///{home}/actdb.sqlite"
    try:
        store = Store.init(StoreConfig.resolve(home, url))
        t0 = time.perf_counter()
        fill(store, args.neurons)
        n_rows = MODELS * STEPS * LAYERS * args.neurons
        print(
            f"filled {store.engine.dialect.name}: {n_rows:,} universality + neuron_stat rows, {4 * n_rows:,} "
            f"neuron_match rows in {time.perf_counter() - t0:.0f}s"
        )
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
        u = timed(lambda: universal_neurons(store, model="m2", step=300000, layer=5, threshold=0.3))
        layer_n, neuron_n = (int(x) for x in args.neuron.split("."))
        neuron_n = min(neuron_n, args.neurons - 1)
        nrn = timed(lambda: neuron_story(store, "m2", 300000, layer_n, neuron_n))
        print(f"actdb universal --model m2 --step 300000 --layer 5: {u:.0f} ms (median of 7)")
        print(f"actdb neuron m2@300000 {layer_n}.{neuron_n}: {nrn:.0f} ms (median of 7)")
        explain = "EXPLAIN QUERY PLAN " if store.engine.dialect.name == "sqlite" else "EXPLAIN "
        with store.engine.connect() as conn:
            plan = conn.execute(
                text(
                    explain + "SELECT * FROM v_universality WHERE run_id = 4 AND model = 'm2' "
                    "AND step = 300000 AND dataset = 'pile' AND layer = 5"
                )
            ).fetchall()
        print("plan of the universal query:")
        for row in plan:
            print("  ", " | ".join(str(c) for c in row))
        store.close()
        cli_walls(home, url, args.set, f"{layer_n}.{neuron_n}", args.repeats)
    finally:
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
