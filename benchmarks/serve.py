"""`actdb serve` under load: p50/p95 latency per page type with 8 concurrent clients on 127.0.0.1, and the
server's resident memory over 10,000 requests.

    .venv/bin/python benchmarks/serve.py --store /path/to/demo-store            # an existing store (SQLite)
    .venv/bin/python benchmarks/serve.py --synthetic DIR [--neurons 3072]        # benchmarks/query.py's paper scale

(--synthetic fills DIR with benchmarks/query.py's generated rows unless it holds them already.)

The server runs as its own process (`actdb --home STORE serve --port P`), the clients are threads of this one,
each with one kept-alive HTTP connection, so on a 2-core machine clients and server share the cores. Each page
type gets `--requests` requests (a bounded count), spread over the clients, mixed in random order; addresses are
drawn from the store (universal neurons, their pages, list filters and pages, tokens that neurons fire on). The
baseline, measured in the same run, is the static stylesheet: the server's floor for one request. Then
`--memory-requests` more requests of the same mix, with the server's RSS sampled every 1,000.
"""

from __future__ import annotations

import argparse
import http.client
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import psutil

from actdb.query.explanations import explained_neurons
from actdb.query.queries import universal_neurons
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store

CLIENTS = 8


def addresses(config: StoreConfig, rng: random.Random) -> dict[str, list[str]]:
    """Per page type, the addresses its requests draw from."""
    store = Store.open(config, read_only=True)
    try:
        universal = list(universal_neurons(store, limit=2000))
        tokens = sorted({r["token"][1:-1] for r in explained_neurons(store) if r["token"]})[:200]
    finally:
        store.close()
    neurons = [f"/neuron/{quote(r['model'])}@{r['step']}/{r['layer']}.{r['neuron']}" for r in universal]
    models = sorted({r["model"] for r in universal})
    steps = sorted({r["step"] for r in universal})
    lists = ["/universal", "/universal?page=3&sort=stability"] + [
        "/universal?" + urlencode({"model": rng.choice(models), "step": rng.choice(steps), "layer": layer})
        for layer in range(4)
    ]
    return {
        "static": ["/static/style.css"],
        "home": ["/"],
        "neuron": neurons,
        "universal": lists,
        "search": [f"/search?token={quote(t)}" for t in tokens] or ["/search?token=the"],
        "runs": ["/runs"],
        "sql": ["/sql?" + urlencode({"q": f"SELECT * FROM v_universality WHERE model = '{models[0]}' LIMIT 50"})],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: StoreConfig) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    actdb = Path(sys.executable).with_name("actdb")
    proc = subprocess.Popen(
        [str(actdb), "--home", str(config.home), "--db", config.database_url, "serve", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server did not start: {proc.stderr.read()}") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not listen within 60 s")


def load(port: int, jobs: list[tuple[str, str]]) -> dict[str, list[float]]:
    """Run `jobs` (page type, address) over CLIENTS threads; milliseconds per request, by page type. A status
    other than 200 stops the run."""
    timings: dict[str, list[float]] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def client(mine: list[tuple[str, str]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for kind, path in mine:
            t0 = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            ms = 1000 * (time.perf_counter() - t0)
            if response.status != 200:
                errors.append(f"{path}: {response.status}")
                return
            with lock:
                timings.setdefault(kind, []).append(ms)
        conn.close()

    threads = [threading.Thread(target=client, args=(jobs[i::CLIENTS],)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return timings


def load_one(port: int, path: str) -> float:
    """Milliseconds of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"{path}: {response.status}")
    return 1000 * (time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, help="an existing store folder (its SQLite file)")
    ap.add_argument("--synthetic", type=Path, help="folder of benchmarks/query.py's paper-scale store (filled if new)")
    ap.add_argument("--neurons", type=int, default=3072, help="neurons per layer of the synthetic store")
    ap.add_argument("--requests", type=int, default=200, help="requests per page type for the latency table")
    ap.add_argument("--memory-requests", type=int, default=10_000, help="requests while RSS is sampled")
    args = ap.parse_args()
    rng = random.Random(0)
    if args.synthetic and (args.synthetic / "actdb.sqlite").exists():
        config = StoreConfig.resolve(args.synthetic, None)
    elif args.synthetic:
        import importlib.util

        spec = importlib.util.spec_from_file_location("query_bench", Path(__file__).with_name("query.py"))
        query_bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(query_bench)  # benchmarks/query.py: the same generated rows

        config = StoreConfig.resolve(args.synthetic, None)
        store = Store.init(config)
        t0 = time.perf_counter()
        query_bench.fill(store, args.neurons)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        store.close()
        print(f"filled the synthetic store in {time.perf_counter() - t0:.0f} s")
    else:
        if args.store is None:
            raise SystemExit("give --store DIR or --synthetic")
        config = StoreConfig.resolve(args.store, None)
    pages = addresses(config, rng)
    proc, port = start_server(config)
    try:
        server = psutil.Process(proc.pid)
        cold = {k: load_one(port, v[0]) for k, v in pages.items()}  # first request after start, one client
        load(port, [(k, rng.choice(v)) for k, v in pages.items() for _ in range(CLIENTS)])  # warm-up
        jobs = [(k, rng.choice(v)) for k, v in pages.items() for _ in range(args.requests)]
        rng.shuffle(jobs)
        t0 = time.perf_counter()
        timings = load(port, jobs)
        wall = time.perf_counter() - t0
        floor = statistics.median(timings["static"])
        print(f"{len(jobs)} requests from {CLIENTS} clients in {wall:.1f} s ({len(jobs) / wall:.0f} req/s)")
        print("| page | requests | p50 ms | p95 ms | p50 / static p50 | first request after start, alone (ms) |")
        print("|---|---|---|---|---|---|")
        for kind, values in timings.items():
            p50, p95 = percentile(values, 50), percentile(values, 95)
            print(f"| {kind} | {len(values)} | {p50:.1f} | {p95:.1f} | {p50 / floor:.1f}x | {cold[kind]:.0f} |")
        samples = [server.memory_info().rss]
        done = 0
        while done < args.memory_requests:
            n = min(1000, args.memory_requests - done)
            load(port, [(k, rng.choice(v)) for k, v in rng.choices(list(pages.items()), k=n)])
            done += n
            samples.append(server.memory_info().rss)
        mib = [s / 2**20 for s in samples]
        if done == 0:
            print(f"server RSS: {mib[0]:.0f} MiB")
            return
        print(
            f"server RSS over {done:,} more requests, every 1,000: "
            + ", ".join(f"{m:.0f}" for m in mib)
            + f" MiB (first to last {mib[-1] - mib[0]:+.0f} MiB, second to last {mib[-1] - mib[1]:+.0f} MiB)"
        )
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
