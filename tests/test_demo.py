"""A reduced `actdb demo` end to end: every stage leaves its rows and files, and a rerun continues."""

import json
import re

from sqlalchemy import func, select

from actdb.store.database.connection import Store
from actdb.store.database.schema import Ablation, ActivationSet, CorrelationRun, NeuronStat, Persistence, Universality


def test_reduced_demo_end_to_end(run_cli, store_config):
    args = ("demo", "--seeds", 2, "--steps", "0,30", "--tokens", 2048, "--controls", 2, "--threshold", 0.05, "--quiet")
    r = run_cli(*args)
    assert r.exit_code == 0, r.stderr
    assert "Universal neurons" in r.stdout and "report:" in r.stdout
    assert "same seed, 0 vs 30" in r.stdout and "other seed, both at 30" in r.stdout
    assert "Trajectories: win rate" in r.stdout and "Trajectories: ensemble gain" in r.stdout
    assert "Concept experts (Python constructs" in r.stdout and "emergence_step" in r.stdout
    assert "Interventional robustness across seeds" in r.stdout and "replace" in r.stdout
    cluster = re.search(r"max \|delta max-corr\| against run \d+: ([0-9.e+-]+)", r.stdout)
    assert cluster and float(cluster.group(1)) < 1e-5, r.stdout  # the Dask stage recomputes the stored run
    home = store_config.home
    for seed in (0, 1):
        for step in (0, 30):
            assert (home / "zoo" / f"seed{seed}" / f"step-{step}" / "config.json").exists()
            assert (home / "activations" / f"seed{seed}" / f"step-{step}" / "stdlib-heldout.mlp.post.h5").exists()
    assert (home / "report" / "index.html").exists() and (home / "report" / "similarity.png").exists()
    store = Store.open(store_config)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(ActivationSet).where(ActivationSet.status == "complete")) == 4
        assert s.scalar(select(func.count()).select_from(NeuronStat)) == 4 * 2 * 512
        runs = s.scalars(select(CorrelationRun)).all()
        assert {(r.kind, r.control) for r in runs} == {
            ("cross_model", "none"),
            ("cross_model", "token"),
            ("within_model", "none"),
            ("similarity", "none"),
        }
        assert all(r.status == "complete" for r in runs)
        assert s.scalar(select(func.count()).select_from(Universality)) > 0
        assert s.scalar(select(func.count()).select_from(Persistence)) == 2 * 2
        n_ablations = s.scalar(select(func.count()).select_from(Ablation))
    store.close()
    again = run_cli(*args)
    assert again.exit_code == 0 and "already complete" in again.stdout and "already holds" in again.stdout
    store = Store.open(store_config)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Ablation)) == n_ablations
        assert s.scalar(select(func.count()).select_from(CorrelationRun)) == len(runs)
    store.close()
    listing = json.loads(run_cli("universal", "--by-layer", "--format", "json").stdout)
    assert {row["step"] for row in listing} == {0, 30}
