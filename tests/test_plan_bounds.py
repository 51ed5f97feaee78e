"""`actdb plan` bounds its inputs before building anything and plans a step from counts: a huge request is
refused in one line at once, and the count-based layout equals the engine planner's own by bisection."""

from __future__ import annotations

import subprocess
import sys

import pytest

from actdb.compute.correlation.engine import CorrelationOptions
from actdb.compute.planning.operations import layout_by_bisection, layout_by_counts, synthetic_inputs
from actdb.compute.planning.shapes import ARCHITECTURES, MAX_TASKS, PlanRequest, custom_architecture
from actdb.store.errors import ActdbError

MIB = 2**20


def _plan(*args: str) -> subprocess.CompletedProcess:
    """`actdb plan ARGS` in a fresh interpreter; a request that builds per-model objects would run for minutes
    (340 s and 20 GB before) and hit the timeout."""
    return subprocess.run(
        [sys.executable, "-m", "actdb.query.cli", "plan", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--models", "99999999999", "--steps", "1000", "--tokens", "5M", "--arch", "gpt2-small"],
            "--models 99,999,999,999 makes 59,999,999,998,200,000,000,012 (pair x layer) tasks per step",
        ),
        (["--models", "5", "--steps", "99999999999", "--tokens", "5M", "--arch", "gpt2-small"], "--steps 99,999"),
        (["--models", "5", "--steps", "5", "--tokens", "1e18", "--arch", "gpt2-small"], "--tokens 1,000,000,000"),
        (
            [
                "--models",
                "5",
                "--steps",
                "5",
                "--tokens",
                "5M",
                "--layers",
                "4",
                "--d-mlp",
                "10000000000",
                "--params",
                "1M",
            ],
            "is more than the planner takes per set",
        ),
    ],
)
def test_huge_requests_are_refused_in_one_line(args, message):
    done = _plan(*args)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_largest_request_allowed_is_named():
    with pytest.raises(ActdbError, match=r"with 12 layers plan at most 91 models") as info:
        PlanRequest(ARCHITECTURES["gpt2-small"], models=92, steps=1, tokens=1000).check()
    assert "\n" not in str(info.value)
    PlanRequest(ARCHITECTURES["gpt2-small"], models=91, steps=1, tokens=1000).check()
    assert 91 * 90 // 2 * 12 <= MAX_TASKS < 92 * 91 // 2 * 12


@pytest.mark.parametrize("budget_mib", [1, 30, 64, 100, 400, 5000])
@pytest.mark.parametrize("models,control", [(2, "none"), (5, "none"), (4, "token")])
def test_layout_from_counts_equals_the_planner_bisected(models, control, budget_mib):
    arch = custom_architecture(3, 256, 10**6, vocab=500)
    inputs = synthetic_inputs(arch, models)
    options = CorrelationOptions(control=control, chunk_tokens=2048)
    by_counts = layout_by_counts(inputs, 500, options, budget_mib * MIB)
    assert by_counts == layout_by_bisection(inputs, 500, options, budget_mib * MIB)
