"""The report's robustness section: IR_norm against training step for every complete robustness run, with its
bootstrap CI over contexts, beside the band its random controls span."""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

from actdb.query.figures import pyplot, save_figure
from actdb.query.output import render
from actdb.query.robustness_tables import robustness_by_step, robustness_controls
from actdb.store.database.connection import Store

MISSING = (
    "no robustness run yet: `actdb robustness run --models SEED1,SEED2,... (--ablate universal | --generate replace "
    "| --edits FILE)`"
)


def robustness_section(store: Store, out: Path) -> str:
    """The section's HTML: one panel per run (IR_norm with 95 % CI, control mean and min-max band), and the table."""
    rows = robustness_by_step(store)
    title = "<h2>Interventional robustness across seeds (IR_norm vs step)</h2>"
    if not rows:
        return f"{title}<p class=missing>{MISSING}</p>"
    runs: dict[int, list] = defaultdict(list)
    for r in rows:
        runs[r["run_id"]].append(r)
    controls: dict[tuple[int, int], list[float]] = defaultdict(list)
    for c in robustness_controls(store):
        if c["ir_norm"] is not None:
            controls[(c["run_id"], c["step"])].append(c["ir_norm"])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (run_id, steps) in zip(axes[0], sorted(runs.items()), strict=True):
        x = list(range(len(steps)))
        band = [controls.get((run_id, r["step"]), []) for r in steps]
        if any(band):
            ax.fill_between(
                x, [min(b) if b else float("nan") for b in band], [max(b) if b else float("nan") for b in band],
                color="grey", alpha=0.3, label=f"controls (min-max of {steps[0]['n_controls']})",
            )  # fmt: skip
            ax.plot(x, [r["control_mean"] for r in steps], "--", color="black", lw=1, label="controls' mean")
        y = [r["ir_norm"] for r in steps]
        low = [(r["ir_norm"] - r["ir_norm_ci_low"]) if r["ir_norm_ci_low"] is not None else 0 for r in steps]
        high = [(r["ir_norm_ci_high"] - r["ir_norm"]) if r["ir_norm_ci_high"] is not None else 0 for r in steps]
        ax.errorbar(x, y, yerr=[low, high], fmt="o-", color="C3", capsize=3, label="intervention (95% CI)")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(x, [str(r["step"]) for r in steps])
        ax.set_xlabel("step")
        ax.set_ylabel("IR_norm = IR(x') − IR(x)")
        ax.set_title(f"#{run_id} {steps[0]['intervention']} {steps[0]['spec'][:24]}", fontsize=9)
        ax.legend(fontsize=6)
    image = save_figure(fig, out, "robustness.png")
    note = (
        "IR = 1 − JSD/log2(n) of the seeds' next-token distributions; IR_norm leads because untrained seeds agree "
        "trivially. p is a two-sided rank p against the controls; its floor is 1/(controls + 1)."
    )
    return (
        f'{title}<p>{html.escape(note)}</p><img src="{image}" alt="robustness">'
        f"<details><summary>table</summary><pre>{html.escape(render(rows, 'table'))}</pre></details>"
    )
