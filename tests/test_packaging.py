"""The distribution installs one importable package, `actdb`, whose subpackages are the design card's folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_the_actdb_package(tmp_path):
    source = tmp_path / "src"  # a copy, so setuptools' build/ folder never lands in the working tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "actdb-*"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("actdb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"actdb"}
    for module in (
        "store/database/connection.py",
        "store/files/activation.py",
        "store/ingest/pipeline.py",
        "compute/correlation/engine.py",
        "compute/concepts/math.py",
        "compute/trajectories/math.py",
        "query/cli.py",
        "query/commands/correlation.py",
        "migrations/env.py",
        "migrations/script.py.mako",
        "migrations/versions/0001_ingestion_tables.py",
    ):
        assert f"actdb/{module}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "actdb = actdb.query.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_version_and_open_are_public():
    import actdb

    assert actdb.__version__ and actdb.__version__[0].isdigit()
    assert callable(actdb.open)
