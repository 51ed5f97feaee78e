"""`actdb report`: a static HTML page with PNG plots (matplotlib, no server) of what the store holds."""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path

import numpy as np

from actdb.query import queries
from actdb.query.listings import persistence_rows
from actdb.query.output import render
from actdb.store.database import Store
from actdb.store.errors import ActdbError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _plt().close(fig)
    return name


def _universal_by_layer_plot(store: Store, out: Path, control: str) -> tuple[str | None, str]:
    try:
        columns, rows = queries.universal_by_layer(store, control=control)
    except ActdbError:
        return None, ""
    plt = _plt()
    steps = sorted({r[1] for r in rows})
    top = max((r[7] for r in rows), default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps) + 1, 3.2), squeeze=False, sharey=True)
    for ax, step in zip(axes[0], steps, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r[1] == step:
                series.setdefault(r[0], []).append((r[3], r[7]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        layers = sorted({r[3] for r in rows})
        ax.set_xticks(layers)
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"step {step}")
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("% universal neurons")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Universal neurons by layer ({control} control)")
    return _save(fig, out, f"universal_by_layer_{control}.png"), render(columns, rows, "table")


def _excess_histogram(store: Store, out: Path, control: str) -> str | None:
    try:
        _cols, rows = queries.max_corr_by_step(store, control)
    except ActdbError:
        return None
    if not rows:
        return None
    plt = _plt()
    steps = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3), squeeze=False, sharey=True)
    bins = np.linspace(-0.1, 1.0, 45)
    for ax, step in zip(axes[0], steps, strict=True):
        mx = [r[1] for r in rows if r[0] == step and r[1] is not None]
        base = [r[2] for r in rows if r[0] == step and r[2] is not None]
        ax.hist(base, bins=bins, alpha=0.6, label="rotation baseline", color="grey")
        ax.hist(mx, bins=bins, alpha=0.6, label="max corr", color="C0")
        ax.set_title(f"step {step}")
        ax.set_xlabel("mean over other models")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Max correlation vs rotation baseline ({control} control)")
    return _save(fig, out, f"excess_hist_{control}.png")


def _persistence_heatmap(store: Store, out: Path) -> tuple[str | None, str]:
    columns, rows = persistence_rows(store, control="none")
    if not rows:
        return None, ""
    plt = _plt()
    models = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r[0] == model]
        pairs = sorted({(r[3], r[4]) for r in mine})
        layers = sorted({r[5] for r in mine})
        grid = np.full((len(layers), len(pairs)), np.nan)
        for r in mine:
            grid[layers.index(r[5]), pairs.index((r[3], r[4]))] = np.nan if r[9] is None else r[9]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(pairs)), [f"{a}→{b}" for a, b in pairs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_title(model)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="p_persist")
    return _save(fig, out, "persistence.png"), render(columns, rows, "table")


def _ablation_plot(store: Store, out: Path) -> tuple[str | None, str]:
    columns, rows = queries.ablations_listing(store)
    if not rows:
        return None, ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 1.8 + 0.45 * len(rows)))
    for i, r in enumerate(rows):
        ax.plot(r[10], i, "o", color="C3", label="ablated set" if i == 0 else None)
        if r[12] is not None:
            ax.errorbar(
                r[12],
                i,
                xerr=[[r[12] - r[14]], [r[15] - r[12]]],
                fmt="s",
                color="grey",
                capsize=3,
                label="random controls (mean, 95% CI)" if i == 0 else None,
            )
    ax.set_yticks(range(len(rows)), [f"#{r[0]} {r[1]}@{r[2]} {r[4]} {r[5][:18]} ({r[6]})" for r in rows], fontsize=7)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("Δ cross-entropy (nats)")
    ax.set_ylim(-0.8, len(rows) - 0.2)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.1 / len(rows)), ncol=2)
    return _save(fig, out, "ablations.png"), render(columns, rows, "table")


def _similarity_plot(store: Store, out: Path) -> str | None:
    _cols, rows = queries.similarity_matrix(store)
    if not rows:
        return None
    plt = _plt()
    labels = sorted(
        {r[0] for r in rows} | {r[1] for r in rows}, key=lambda s: (s.rsplit("@", 1)[0], int(s.rsplit("@", 1)[1]))
    )
    grid = np.full((len(labels), len(labels)), np.nan)
    for src, dst, value, _run in rows:
        grid[labels.index(src), labels.index(dst)] = value
    np.fill_diagonal(grid, 1.0)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(labels), 1 + 0.45 * len(labels)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title("Mean max-corr between activation sets")
    fig.colorbar(im, ax=ax)
    return _save(fig, out, "similarity.png")


def build_report(store: Store, out: Path) -> Path:
    """Write `index.html` and its PNGs into `out`; sections without data say which command produces them."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ActdbError(f"cannot create report folder {out}: {exc.strerror or exc}") from None
    sections = []

    def section(title: str, image: str | None, table: str = "", missing: str = "") -> None:
        body = f'<img src="{image}" alt="{html.escape(title)}">' if image else f"<p class=missing>{missing}</p>"
        if table:
            body += f"<details><summary>table</summary><pre>{html.escape(table)}</pre></details>"
        sections.append(f"<h2>{html.escape(title)}</h2>{body}")

    for control in ("none", "token"):
        img, table = _universal_by_layer_plot(store, out, control)
        section(
            f"Universal neurons by layer ({control} control)",
            img,
            table,
            "no correlation run yet: `actdb correlate` (with `--control token` for the token control)",
        )
        section(
            f"Excess correlation ({control} control)",
            _excess_histogram(store, out, control),
            missing="no correlation run yet",
        )
    img, table = _persistence_heatmap(store, out)
    section("Persistence across checkpoints", img, table, "no persistence yet: `actdb persistence --model M`")
    img, table = _ablation_plot(store, out)
    section("Ablations against matched random controls", img, table, "no ablation yet: `actdb ablate`")
    section("Similarity of every activation set", _similarity_plot(store, out), missing="no correlation run yet")
    page = out / "index.html"
    page.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>actdb report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}img{{max-width:100%}}
pre{{font-size:11px;overflow:auto}}.missing{{color:#888}}</style></head><body>
<h1>actdb report</h1><p>store {html.escape(str(store.config.home))}, generated {datetime.now():%Y-%m-%d %H:%M}</p>
{"".join(sections)}</body></html>""")
    return page
