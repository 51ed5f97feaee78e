"""Matplotlib for the report's pages: the headless backend, chosen once, and how a figure is saved."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (no display), imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> str:
    """Write `fig` as `out/name` (PNG, tight), close it, and return the name the page links to."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return name
