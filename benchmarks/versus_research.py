"""actdb's correlation engine against the research code itself, side by side in one process on the same data.

The research code is Gurnee et al. (2024), github.com/wesg52/universal-neurons: its `StreamingPearsonComputer`
(`correlations_fast.py`, float32 products summed in float64) is loaded at run time from a local clone named by
--research-repo (nothing of it is copied here). It is fed the very activations actdb reads, converted to float32
and held in memory in its layout (layers, neurons, tokens), cut into its default batches of 32 x 512 tokens
before the clock starts: its best case (the research code itself recomputes them with forward passes). A job is one
run of the class over every batch, as `correlations_fast.run_correlation_experiment` runs it: `--baseline none`
(the correlation) or `--baseline rotation` (model 2's activations first rotated layer by layer, the rotation in
the timing). Its scripts run model a against b, c, ... (`slurm/correlation_exp_fast.sh`): a pair of jobs labels
model 1's neurons only, since only model 2 is rotated. actdb labels every model's neurons, so three research
workflows are timed from the same jobs (`WORKFLOWS`): one direction (2 jobs per pair: what one invocation gives),
both directions with the correlation matrix reused (3 jobs) and both directions as its scripts run them, each
model as model 1 (4 jobs). actdb reads the float16 HDF5 files, checks and converts them, and derives its
baseline from the moments with its default 8 draws.

    git clone https://github.com/wesg52/universal-neurons /tmp/universal-neurons   # or any local clone
    .venv/bin/pip install einops        # the only package the class needs that actdb does not install
    .venv/bin/python benchmarks/versus_research.py --research-repo /tmp/universal-neurons [--threads 2]

The module's other imports (transformer_lens, datasets and the plotting in `analysis.correlations`) serve its
command line, not the class: where they are not installed, empty modules stand in for them during the import.
Prints, for one pair and for 4 models (every pair), at the demo's tokens and 4x (`--scales`): the wall and CPU
seconds (all threads: on a machine busy with other work, wall times follow the share of the cores each gets, CPU
seconds less so) of actdb with a cold rotation cache (an empty folder: it computes and keeps its QRs, as a
store's first run) and a warm one (the same folder again: no QR), and of the research code; the FLOPs each does
(actdb's as the planner counts the engine's operations, `correlation_flops`; the research code's products, its
rotations included; neither counts the elementwise work); each one's FLOP rate as a share of a bare float32 GEMM
timed in the same run; the ratios; and each side's peak resident memory above what the process held before it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from itertools import combinations
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets
from threadpoolctl import threadpool_limits

from actdb.compute.correlation.baseline import random_rotation
from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets, memory_budget, plan_passes
from actdb.compute.planning.operations import correlation_flops
from actdb.store.device import resolve_device
from actdb.store.files.activation import ActivationReader

RESEARCH_BATCH = 32 * 512  # correlations_fast.py's default --batch_size of 512-token sequences
ONLY_FOR_ITS_CLI = ("datasets", "transformer_lens", "analysis", "analysis.correlations")


def load_research_class(repo: Path) -> type:
    """`StreamingPearsonComputer` from the clone's `correlations_fast.py`, imported by path."""
    source = repo / "correlations_fast.py"
    if not source.is_file():
        raise SystemExit(f"{source} not found: --research-repo names a clone of wesg52/universal-neurons")
    sys.path.insert(0, str(repo))  # its `from utils import *`
    stand_ins = {}
    for name in ONLY_FOR_ITS_CLI:
        if importlib.util.find_spec(name.split(".")[0]) is None or name == "analysis.correlations":
            module = types.ModuleType(name)
            module.HookedTransformer = module.summarize_correlation_matrix = module.flatten_layers = None
            stand_ins[name] = sys.modules.setdefault(name, module)
    try:
        spec = importlib.util.spec_from_file_location("universal_neurons_correlations_fast", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(repo))
        for name, module_in in stand_ins.items():
            if sys.modules.get(name) is module_in:
                del sys.modules[name]
    return module.StreamingPearsonComputer


# What the research code must run to label neurons, per unordered pair (i, j) of models: its correlation job
# (`--baseline none`) gives both directions' maxima from one matrix, but its rotation-baseline job rotates model 2
# only, so each model's neurons need their own rotation job. Each workflow is a sum of the jobs timed below.
WORKFLOWS = {
    "one direction": ("corr ij", "rot j"),  # model i's neurons only (one invocation of its script pair)
    "both, least work": ("corr ij", "rot j", "rot i"),  # every model's neurons, the correlation matrix reused
    "both, as its scripts run": ("corr ij", "rot j", "corr ji", "rot i"),  # each model as model_1 against the other
}


def research_jobs(cls: type, data: list, layers: int, d: int, threads: int) -> dict[str, tuple[float, float, float]]:
    """Every pair's jobs through the research class: per job kind (`corr ij`, `rot j`, `corr ji`, `rot i`) summed
    over pairs, (seconds of the whole method, seconds inside the class alone, CPU seconds of the whole method)."""
    import torch

    torch.set_num_threads(threads)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(n_layers=layers, d_mlp=d))
    rotations = [
        [torch.from_numpy(random_rotation(d, 0, k, layer).astype(np.float32)) for layer in range(layers)]
        for k in range(len(data))
    ]
    times = {kind: [0.0, 0.0, 0.0] for kind in ("corr ij", "rot j", "corr ji", "rot i")}
    for i, j in combinations(range(len(data)), 2):
        for kind, (m1, m2), rotate in (
            ("corr ij", (i, j), False),
            ("rot j", (i, j), True),
            ("corr ji", (j, i), False),
            ("rot i", (j, i), True),
        ):
            started, cpu, in_class = time.perf_counter(), time.process_time(), 0.0
            computer = cls(model, model)
            for b1, b2 in zip(data[m1], data[m2], strict=True):
                if rotate:  # correlations_fast.run_correlation_experiment's rotation of model 2's neurons
                    b2 = torch.stack(
                        [torch.einsum("n t, m n -> m t", b2[layer], rotations[m2][layer]) for layer in range(layers)]
                    )
                t0 = time.perf_counter()
                computer.update_correlation_data(b1, b2)
                in_class += time.perf_counter() - t0
            t0 = time.perf_counter()
            r = computer.compute_correlation().reshape(layers * d, layers * d).float()
            r.abs().amax(dim=1), r.abs().amax(dim=0)  # the maxima its summaries take
            in_class += time.perf_counter() - t0
            for k, value in enumerate((time.perf_counter() - started, in_class, time.process_time() - cpu)):
                times[kind][k] += value
    return {kind: tuple(v) for kind, v in times.items()}


def workflow_times(jobs: dict, workflow: str) -> tuple[float, float, float]:
    """(wall, in-class, CPU) seconds of one workflow: the sum of its jobs."""
    return tuple(sum(jobs[kind][k] for kind in WORKFLOWS[workflow]) for k in range(3))


def bare_gemm_rate(neurons: int, threads: int) -> float:
    """FLOP/s of a bare float32 GEMM, (N x 16,384) @ (16,384 x N) as the research batches are, the best of a few."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((RESEARCH_BATCH, neurons), dtype=np.float32)
    b = rng.standard_normal((RESEARCH_BATCH, neurons), dtype=np.float32)
    out = np.empty((neurons, neurons), dtype=np.float32)
    best = float("inf")
    with threadpool_limits(threads):
        np.matmul(a.T, b, out=out)
        for _ in range(5):
            t0 = time.perf_counter()
            np.matmul(a.T, b, out=out)
            best = min(best, time.perf_counter() - t0)
    return 2 * neurons * neurons * RESEARCH_BATCH / best


def resident_peak_reset() -> int:
    """Reset this process's peak resident set (Linux: /proc/self/clear_refs) and return the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def timed(run) -> tuple[object, float, float, float]:
    """(result, wall seconds, CPU seconds of the process, peak resident MB above the resident size before)."""
    before = resident_peak_reset()
    t0, cpu = time.perf_counter(), time.process_time()
    result = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
    return result, wall, cpu, (_status_bytes("VmHWM") - before) / 2**20


def research_flops(n_sets: int, layers: int, d: int, tokens: int, workflow: str) -> int:
    """A research workflow's products over every pair: N x T x N per job, and for each rotation job the rotation
    of model 2's activations, layer by layer (d x d x T)."""
    pairs = n_sets * (n_sets - 1) // 2
    n, jobs = layers * d, WORKFLOWS[workflow]
    rotations = sum(kind.startswith("rot") for kind in jobs)
    return pairs * (len(jobs) * 2 * n * n * tokens + rotations * layers * 2 * d * d * tokens)


def compare(cls: type, n_sets: int, layers: int, d: int, tokens: int, threads: int, draws: int) -> dict:
    """One case on freshly written sets: actdb (cold, then warm rotation cache) and the research code, printed."""
    import torch

    root = Path(tempfile.mkdtemp(prefix="actdb-vs-"))
    with ProcessPoolExecutor(1) as pool:
        sets = pool.submit(write_sets, root, n_sets, layers, d, tokens).result()
    ids = np.zeros((tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(ids, dtype=bool)
    data = []  # the same values as float32, in the research layout (layers, neurons, tokens), batch by batch
    for s in sets:
        with ActivationReader(s.path) as r:
            x = np.stack(r.read_rows(0, tokens)).astype(np.float32).transpose(0, 2, 1)
        data.append(
            [
                torch.from_numpy(np.ascontiguousarray(x[:, :, b : b + RESEARCH_BATCH]))
                for b in range(0, tokens, RESEARCH_BATCH)
            ]
        )
    del x
    backend = resolve_device("cpu").array
    cache = root / "rotations"
    options = CorrelationOptions(baseline_draws=draws, rotation_cache=str(cache))
    passes = plan_passes(sets, 1, options, memory_budget(options, backend))
    flops = correlation_flops(sets, passes, tokens, options, 1)
    ours_flops = {"cold": flops.total, "warm": flops.total - flops.qr}
    gemm = bare_gemm_rate(layers * d, threads)
    row = {"sets": n_sets, "tokens": tokens, "gemm": gemm}
    with threadpool_limits(threads):
        correlate_sets(sets, ids, mask, CorrelationOptions(baseline_draws=draws), backend)  # the page cache
        for cache_state in ("cold", "warm"):  # an empty rotation cache folder, then the same folder again
            result, wall, cpu, peak = timed(lambda: correlate_sets(sets, ids, mask, options, backend))
            row[cache_state] = (wall, cpu, peak, ours_flops[cache_state], dict(result.seconds))
    # its own clock starts after its rotations are drawn (its best case); the peak covers the whole call
    jobs, _wall, _cpu, theirs_peak = timed(lambda: research_jobs(cls, data, layers, d, threads))
    for workflow in WORKFLOWS:
        theirs, in_class, theirs_cpu = workflow_times(jobs, workflow)
        flops_w = research_flops(n_sets, layers, d, tokens, workflow)
        row[workflow] = (theirs, theirs_cpu, theirs_peak, flops_w, in_class)
    report(row, layers, d, threads, draws, flops)
    shutil.rmtree(root)
    return row


def report(row: dict, layers: int, d: int, threads: int, draws: int, flops) -> None:
    """The case's lines: each side's times, FLOPs, share of the bare GEMM's rate and peak memory; the ratios."""
    gemm = row["gemm"]
    pairs = row["sets"] * (row["sets"] - 1) // 2
    print(
        f"{row['sets']} sets ({pairs} pair(s)) x {layers} x {d} neurons x {row['tokens']:,} tokens, {threads} "
        f"threads each, load average {os.getloadavg()[0]:.1f}; bare float32 GEMM {gemm / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    g = 1e9
    print(
        f"  actdb FLOPs ({draws} draws): pair products {flops.pair_products / g:.1f} G, Grams (SYRK) "
        f"{flops.grams / g:.1f} G, baseline phase {flops.baseline_phase / g:.1f} G, QRs {flops.qr / g:.1f} G "
        f"(cold cache only), sums and adds {(flops.sums + flops.adds) / g:.1f} G; actdb labels every model's neurons"
    )
    for name in ("cold", "warm"):
        wall, cpu, peak, ours_flops, phases = row[name]
        print(
            f"  actdb, {name} rotation cache: wall {wall:.2f} s, CPU {cpu:.2f} s, {ours_flops / g:.1f} GFLOP = "
            f"{ours_flops / wall / gemm:.2f} of the bare GEMM's rate (phases "
            f"{', '.join(f'{k} {v:.2f}' for k, v in phases.items())}); peak RSS +{peak:.0f} MB"
        )
    for workflow, jobs in WORKFLOWS.items():
        theirs, theirs_cpu, theirs_peak, theirs_flops, in_class = row[workflow]
        print(
            f"  research code, {workflow} ({len(jobs)} jobs per pair: {', '.join(jobs)}): wall {theirs:.2f} s "
            f"({in_class:.2f} s in StreamingPearsonComputer), CPU {theirs_cpu:.2f} s, {theirs_flops / g:.1f} GFLOP = "
            f"{theirs_flops / theirs / gemm:.2f} of the bare GEMM's rate; peak RSS +{theirs_peak:.0f} MB"
        )
        for name in ("cold", "warm"):
            wall, cpu, _peak, ours_flops, _phases = row[name]
            print(
                f"    actdb ({name} cache) / research code: {theirs / wall:.2f}x wall, {theirs_cpu / cpu:.2f}x CPU; "
                f"actdb does {ours_flops / theirs_flops:.2f}x the research FLOPs"
            )
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--research-repo", type=Path, required=True, help="a local clone of wesg52/universal-neurons")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=24_576)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="multiples of --tokens to run")
    ap.add_argument("--sets", type=int, nargs="+", default=[2, 4], help="models per case (every pair of them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draws", type=int, default=CorrelationOptions.baseline_draws)
    args = ap.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("this benchmark measures peak memory through /proc/self/clear_refs (Linux)")
    cls = load_research_class(args.research_repo)
    rows = [
        compare(cls, n_sets, args.layers, args.d_mlp, scale * args.tokens, args.threads, args.draws)
        for scale in args.scales
        for n_sets in args.sets
    ]
    names = list(WORKFLOWS)
    print(
        "| case | actdb wall, cold / warm rotation cache | research code wall: "
        + " / ".join(names)
        + " | actdb (warm) faster by: "
        + " / ".join(names)
        + " | actdb (cold) faster by, same order | FLOPs actdb (warm) / research, same order |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        cw, ww, wf = r["cold"][0], r["warm"][0], r["warm"][3]
        print(
            f"| {r['sets']} models, {r['tokens']:,} tokens | {cw:.2f} / {ww:.2f} s | "
            + " / ".join(f"{r[w][0]:.2f} s" for w in names)
            + " | "
            + " / ".join(f"{r[w][0] / ww:.2f}x" for w in names)
            + " | "
            + " / ".join(f"{r[w][0] / cw:.2f}x" for w in names)
            + " | "
            + " / ".join(f"{wf / r[w][3]:.2f}" for w in names)
            + " |"
        )


if __name__ == "__main__":
    main()
