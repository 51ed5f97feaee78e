"""Each `actdb demo` stage's wall and CPU seconds: runs the demo (same arguments as `actdb`) and prints, to stderr,
one line per stage and per part of the report stage with its wall seconds, this process's CPU seconds
(`time.process_time`, all threads) and its reaped children's (the zoo's training processes, the Dask workers).
CPU seconds are what to compare on a shared machine; wall seconds only on a quiet one.

    .venv/bin/python benchmarks/demo_stages.py --home /tmp/x demo
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

MARKS: list[tuple[str, float, float, float]] = []


def _mark(name: str) -> None:
    """Close the previous mark's interval (printed) and open one named `name`."""
    wall, own = time.perf_counter(), time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = children.ru_utime + children.ru_stime
    if MARKS:
        last, w, o, c = MARKS[-1]
        print(
            f"TIMING {last[:40]:40s} wall {wall - w:7.1f}  cpu_self {own - o:7.1f}  cpu_children {child - c:7.1f}",
            file=sys.stderr,
            flush=True,
        )
    MARKS.append((name, wall, own, child))


def _timed(name: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        _mark(f"  report:{name}")
        try:
            return fn(*args, **kwargs)
        finally:
            _mark(f"  report:after {name}")

    return run


def main() -> None:
    import actdb.query.demo as demo
    from actdb.query.cli import main as cli_main

    stages = demo._stages

    def marked_stages(echo: Callable[[str], None]) -> Callable[[str], None]:
        stage = stages(echo)

        def marked(text: str) -> None:
            _mark(text)
            stage(text)

        return marked

    demo._stages = marked_stages
    for name in ("build_report", "_summary", "_similarity_summary", "_concept_summary", "_robustness_summary"):
        setattr(demo, name, _timed(name, getattr(demo, name)))
    try:
        cli_main(sys.argv[1:])
    finally:
        _mark("end")


if __name__ == "__main__":  # the zoo's spawned processes import this file again: only the parent runs the demo
    main()
