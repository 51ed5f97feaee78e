"""How much do universal-neuron labels depend on the baseline's random rotations, and what does it cost to make them
not? Correlations with different baseline seeds (`--seeds`, default 101 and 202), and the Jaccard overlap of their
universal sets at the threshold (with more than two seeds, the mean over every pair), for: one draw; K draws for
every neuron (before); K draws plus adaptive draws for the undecided neurons up to M (after). Each configuration's
time is measured in the same process, on the same files, and the extra cost is stated against the K-draw run; on a
loaded machine the steadier number is the refinement's share of its own run's engine time, in CPU seconds (the
engine's per-phase `cpu_seconds`; on a store, from `correlate`'s log line). On a store each configuration runs once
cold (the rotation cache emptied: every QR computed, as in a first run on a new seed) and then warm (the cache holds
them: every later run on that seed and width, e.g. the other steps of a study).

    .venv/bin/python benchmarks/label_stability.py --home actdb-demo [--step 800] [--threshold 0.2]
    .venv/bin/python benchmarks/label_stability.py --synthetic [--threshold-quantile 0.95]

`--home` copies a store (the demo's) and correlates one step through `actdb.compute.correlation.run`;
`--synthetic` writes demo-shaped float16 sets (4 models x 2 layers x 512 neurons, 24,576 tokens, neurons sharing
latent features of graded strength) and runs the engine alone, with the threshold at a quantile of the excess
(default: the top 5 % universal, as at the demo's step 800).
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from actdb.compute.correlation.engine import CorrelationOptions, SetInput, correlate_sets
from actdb.compute.correlation.universality import score_universality
from actdb.store.device import resolve_device
from actdb.store.files.activation import ActivationHeader, ActivationWriter


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


def _agreement(labels: dict) -> tuple[str, str]:
    """The universal counts per baseline seed, and the Jaccard of their universal sets: of the one pair, or the
    mean over every pair of seeds with its range (one pair's Jaccard moves by a few hundredths with the seeds)."""
    counts = " / ".join(str(len(s)) for s in labels.values())
    pairs = [_jaccard(a, b) for a, b in itertools.combinations(labels.values(), 2)]
    if len(pairs) == 1:
        return counts, f"{pairs[0]:.3f}"
    return counts, f"{np.mean(pairs):.3f} ({min(pairs):.3f}-{max(pairs):.3f}, {len(pairs)} pairs)"


def _synthetic(root: Path, n_sets: int = 4, n_layers: int = 2, d_mlp: int = 512, n_seq: int = 96, seq_len: int = 256):
    """Demo-shaped sets: every model mixes 64 shared latent features into its neurons with strengths graded from
    none to strong, plus independent noise, so excess correlations spread over a range like a trained zoo's."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 2000, (n_seq, seq_len)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[:, 0] = False
    t = tokens.size
    latent = rng.standard_normal((t, 64)).astype(np.float32)
    n = n_layers * d_mlp
    inputs = []
    for k in range(n_sets):
        strength = rng.permutation(np.linspace(0.0, 0.6, n)).astype(np.float32)
        sparse = rng.standard_normal((64, n)).astype(np.float32) * (rng.random((64, n)) < 0.1)
        x = ((latent @ sparse) * strength + rng.standard_normal((t, n), dtype=np.float32)).astype(np.float16)
        path = root / f"s{k}.h5"
        w = ActivationWriter(path, ActivationHeader(f"m{k}", 0, "bench", "mlp.post", n_layers, d_mlp, t, "float16"))
        w.write_rows(0, [x[:, i * d_mlp : (i + 1) * d_mlp] for i in range(n_layers)])
        w.finish()
        means = x[mask.reshape(-1)].astype(np.float64).mean(axis=0)
        inputs.append(SetInput(k, str(path), n_layers, d_mlp, means, rotation_key=k))
    return inputs, tokens, mask


def _labels(result, threshold: float) -> tuple[set, float]:
    labels, draws = set(), []
    for key, sc in score_universality(result).items():
        labels |= {(key, int(i)) for i in np.flatnonzero(sc.excess_corr > threshold)}
        draws.append(sc.n_draws[sc.n_draws > 0])
    return labels, float(np.concatenate(draws).mean())


def _engine(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="actdb-stability-"))
    try:
        inputs, tokens, mask = _synthetic(root)
        cpu = resolve_device("cpu").array
        probe = correlate_sets(inputs, tokens, mask, CorrelationOptions(baseline_draws=args.draws), cpu)
        excess = np.concatenate([s.excess_corr for s in score_universality(probe).values()])
        threshold = float(np.nanquantile(excess, args.threshold_quantile))
        print(
            f"synthetic: {len(inputs)} sets x 2 layers x 512 neurons, {int(mask.sum())} counted tokens; threshold "
            f"{threshold:.4f} (the {args.threshold_quantile:.0%} quantile of the excess at K = {args.draws})"
        )
        configs = [
            ("1 draw", CorrelationOptions(baseline_draws=1)),
            (f"K = {args.draws} (before)", CorrelationOptions(baseline_draws=args.draws)),
        ] + [
            (
                f"K = {args.draws}, adaptive to {cap} (after)",
                CorrelationOptions(
                    baseline_draws=args.draws,
                    adaptive_threshold=threshold,
                    adaptive_confidence=args.confidence,
                    max_draws=cap,
                ),
            )
            for cap in args.max_draws
        ]
        _report(configs, lambda o: correlate_sets(inputs, tokens, mask, o, cpu), threshold, args.repeat, args.seeds)
    finally:
        shutil.rmtree(root)


def _report(configs, run, threshold: float, repeat: int, seeds: list[int]) -> None:
    """One row per configuration; `extra` is the engine time against the K-draw run (the second row), wall and
    CPU seconds (`time.process_time`, all threads: steadier than wall time on a loaded machine), and "adaptive
    phase" the engine's own timing of the refinement in the fastest run, with its share of the rest of that run
    (immune to load between runs)."""
    print(
        f"| draws | universal (seed {' / '.join(map(str, seeds))}) | Jaccard | mean draws per neuron | engine s | "
        "engine CPU s | adaptive "
        "phase s (share) | adaptive phase CPU s (share) | extra wall | extra CPU | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    before = before_cpu = None
    for row, (name, opts) in enumerate(configs):
        labels, seconds, cpu, adaptive, adaptive_cpu, draws, peak = {}, [], [], [], [], [], 0
        for seed in seeds:
            o = CorrelationOptions(**{**vars(opts), "baseline_seed": seed})
            for _ in range(repeat):
                tracemalloc.start()
                t0, c0 = time.perf_counter(), time.process_time()
                result = run(o)
                seconds.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                adaptive.append((result.seconds.get("adaptive", 0.0), seconds[-1]))
                adaptive_cpu.append((result.cpu_seconds.get("adaptive", 0.0), sum(result.cpu_seconds.values())))
                peak = max(peak, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
            labels[seed], mean_draws = _labels(result, threshold)
            draws.append(mean_draws)
        best, best_cpu = min(seconds), min(cpu)  # the least disturbed run on a shared machine
        before, before_cpu = (best, best_cpu) if row == 1 else (before, before_cpu)
        extra = f"{(best / before - 1) * 100:+.1f} %" if row > 1 else "—"
        extra_cpu = f"{(best_cpu / before_cpu - 1) * 100:+.1f} %" if row > 1 else "—"
        counts, jaccard = _agreement(labels)
        print(
            f"| {name} | {counts} | {jaccard} | {np.mean(draws):.2f} | {best:.2f} | "
            f"{best_cpu:.2f} | {_phase(adaptive)} | {_phase(adaptive_cpu)} | {extra} | {extra_cpu} | "
            f"{peak / 2**20:.0f} |",
            flush=True,
        )


def _phase(runs: list[tuple[float, float]]) -> str:
    """The refinement's seconds in the fastest run, and its share of the rest of that run's engine time (`runs`:
    (phase, whole run) pairs, wall or CPU seconds)."""
    phase, total = min(runs, key=lambda r: r[1])
    return f"{phase:.2f} ({phase / (total - phase) * 100:+.1f} %)" if phase else "—"


def _store(args) -> None:
    from actdb.compute.correlation.rotation_cache import FOLDER
    from actdb.compute.correlation.run import CorrelationRequest, correlate
    from actdb.query.queries import universal_neurons
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store
    from actdb.store.refs import SetRef

    copy = Path(tempfile.mkdtemp(prefix="actdb-stability-")) / "store"
    shutil.copytree(args.home, copy, ignore=shutil.ignore_patterns("zoo", "report"))
    store = Store.open(StoreConfig.resolve(copy, None))
    sets = [SetRef(m, args.step) for m in args.models.split(",")]
    print(f"{args.home}: {args.models} at step {args.step}, excess > {args.threshold}, confidence {args.confidence}.")
    print("Per configuration and baseline seed: one cold run (the store's rotation cache emptied first, so the run")
    print(f"computes every QR it needs, as a first run on a new seed does) and {args.repeat} warm run(s) (the cache")
    print("filled by the cold run: every later run on that seed and width). Seconds: `correlate` wall time, summed")
    print("over the seeds (warm: the least of the warm runs); extra: against the K-draw run in the same state;")
    print("adaptive share: the refinement's CPU seconds over the rest of the same warm run's engine (its own log).")
    print(
        f"| draws | universal (seed {' / '.join(map(str, args.seeds))}) | Jaccard | draws per neuron | cold s | "
        "warm s | extra cold "
        "| extra warm | adaptive share, warm (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    before = None
    for name, draws, max_draws in [
        ("1 draw", 1, None),
        (f"K = {args.draws} (before)", args.draws, None),
        *((f"K = {args.draws}, adaptive to {cap} (after)", args.draws, cap) for cap in args.max_draws),
    ]:
        labels, cold, warm, said, cpu_shares = {}, 0.0, 0.0, "", []
        for seed in args.seeds:
            request = CorrelationRequest(
                sets=sets,
                seed=seed,
                baseline_draws=draws,
                max_draws=max_draws,
                confidence=args.confidence,
                threshold=args.threshold,
                force=True,
                progress=False,
            )
            shutil.rmtree(copy / FOLDER, ignore_errors=True)
            timings = []
            for run in range(1 + args.repeat):
                lines: list[str] = []
                t0 = time.perf_counter()
                outcome = correlate(store, request, log=lines.append)
                timings.append(time.perf_counter() - t0)
                if run:
                    cpu_shares.append(_adaptive_cpu_share(lines))
            cold += timings[0]
            warm += min(timings[1:])
            said = next((part for line in lines for part in line.split("; ") if "draws per neuron" in part), said)
            rows = universal_neurons(store, run=outcome.run_id, threshold=args.threshold)
            labels[seed] = {(r["model"], r["layer"], r["neuron"]) for r in rows}
        if draws == args.draws and max_draws is None:
            before = (cold, warm)
        extra = ["—", "—"]
        if max_draws is not None:
            extra = [f"{(t / b - 1) * 100:+.1f} %" for t, b in zip((cold, warm), before, strict=True)]
        said = said.split(" (adaptive")[0].replace("baseline draws per neuron ", "") or str(draws)
        counts, jaccard = _agreement(labels)
        print(
            f"| {name} | {counts} | {jaccard} | {said} | {cold:.1f} | {warm:.1f} | "
            f"{extra[0]} | {extra[1]} | {_share(cpu_shares)} |",
            flush=True,
        )
    store.close()
    shutil.rmtree(copy.parent)


def _adaptive_cpu_share(lines: list[str]) -> float | None:
    """The run's adaptive phase over the rest of its engine phases, in CPU seconds, from `correlate`'s log line."""
    found = re.search(r"([0-9.]+) of the engine's ([0-9.]+) CPU-s", " ".join(lines))
    if found is None:
        return None
    phase, total = float(found.group(1)), float(found.group(2))
    return phase / (total - phase)


def _share(shares: list[float | None]) -> str:
    known = [s for s in shares if s is not None]
    return f"{np.median(known) * 100:+.1f} % (median of {len(known)})" if known else "—"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", help="a store to copy (the demo's: actdb-demo)")
    ap.add_argument("--synthetic", action="store_true", help="demo-shaped synthetic sets, engine only")
    ap.add_argument("--step", type=int, default=800)
    ap.add_argument("--models", default="seed0,seed1,seed2,seed3")
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--threshold-quantile", type=float, default=0.95)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument(
        "--max-draws", type=lambda t: [int(x) for x in t.split(",")], default=[16, 32], help="caps, e.g. 16,32"
    )
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument(
        "--seeds",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[101, 202],
        help="baseline seeds, e.g. 101,202,303,404: the Jaccard is then the mean over every pair",
    )
    ap.add_argument(
        "--repeat", type=int, default=2, help="timed runs per configuration and seed (--home: warm, after a cold one)"
    )
    args = ap.parse_args()
    if args.synthetic == bool(args.home):
        ap.error("give --home STORE or --synthetic")
    _engine(args) if args.synthetic else _store(args)


if __name__ == "__main__":
    main()
