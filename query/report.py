"""`actdb report`: a static HTML page with PNG plots (matplotlib, no server) of what the store holds."""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path

import numpy as np

from actdb.query import queries
from actdb.query.figures import pyplot, save_figure
from actdb.query.neuron_pages import family_counts, universal_table
from actdb.query.output import render
from actdb.store.database.connection import Rows, Store
from actdb.store.errors import ActdbError


def hook_tag(hook: str | None) -> str:
    """A file-name suffix for sets read at a hook other than the default `mlp.post`."""
    return "" if hook in (None, "mlp.post") else "_" + hook.replace(".", "_")


def _universal_by_layer_plot(
    store: Store, out: Path, control: str, threshold: float | None, hook: str | None = None
) -> tuple[str | None, str]:
    try:
        rows = queries.universal_by_layer(store, control=control, threshold=threshold, hook=hook)
    except ActdbError:
        return None, ""
    plt = pyplot()
    steps = sorted({r["step"] for r in rows})
    top = max((r["pct_universal"] for r in rows), default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps) + 1, 3.2), squeeze=False, sharey=True)
    layers = sorted({r["layer"] for r in rows})
    for ax, step in zip(axes[0], steps, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows.where(step=step):
            series.setdefault(r["model"], []).append((r["layer"], r["pct_universal"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xticks(layers)
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"step {step}")
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("% universal neurons")
    axes[0][-1].legend(fontsize=7)
    at = "each run's recorded threshold" if threshold is None else f"excess > {threshold}"
    fig.suptitle(f"Universal neurons by layer ({control} control, {at}{', ' + hook if hook else ''})")
    name = f"universal_by_layer_{control}{hook_tag(hook)}"
    _write(out / f"{name}.csv", render(rows, "csv") + "\n")
    return save_figure(fig, out, f"{name}.png"), render(rows, "table")


def _excess_histogram(
    store: Store, out: Path, control: str, threshold: float | None, hook: str | None = None
) -> str | None:
    """Per step, two histograms of the live neurons: max-corr against its rotation baseline (top), and their
    difference, the excess correlation, with the threshold that makes a neuron universal (bottom)."""
    try:
        rows = queries.max_corr_by_step(store, control, hook)
    except ActdbError:
        return None
    if not rows:
        return None
    plt = pyplot()
    steps = sorted({r["step"] for r in rows})
    fig, axes = plt.subplots(2, len(steps), figsize=(3.2 * len(steps), 5.6), squeeze=False, sharey="row")
    bins = np.linspace(-0.1, 1.0, 45)
    for k, step in enumerate(steps):
        at_step = rows.where(step=step)
        mx = [r["mean_max_corr"] for r in at_step if r["mean_max_corr"] is not None]
        base = [r["mean_baseline"] for r in at_step if r["mean_baseline"] is not None]
        excess = [r["excess_corr"] for r in at_step if r["excess_corr"] is not None]
        top, bottom = axes[0][k], axes[1][k]
        top.hist(base, bins=bins, alpha=0.6, label="rotation baseline", color="grey")
        top.hist(mx, bins=bins, alpha=0.6, label="max corr", color="C0")
        top.set_title(f"step {step}: max corr vs baseline", fontsize=9)
        top.set_xlabel("mean over other models")
        bottom.hist(excess, bins=np.linspace(min(-0.1, *excess), max(0.6, *excess), 45), color="C1")
        cut = threshold if threshold is not None else at_step[0]["threshold"]
        if cut is not None:
            bottom.axvline(cut, color="black", ls="--", lw=1, label=f"threshold {cut:g}")
            bottom.legend(fontsize=7)
        above = sum(e > cut for e in excess) if cut is not None else 0
        bottom.set_title(f"step {step}: excess ({above} of {len(excess)} above)", fontsize=9)
        bottom.set_xlabel("excess corr = max corr − baseline")
    axes[0][0].set_ylabel("live neurons")
    axes[1][0].set_ylabel("live neurons")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Max correlation, rotation baseline and excess ({control} control{', ' + hook if hook else ''})")
    return save_figure(fig, out, f"excess_hist_{control}{hook_tag(hook)}.png")


def _persistence_heatmap(store: Store, out: Path, threshold: float | None) -> tuple[str | None, str]:
    rows = queries.persistence_listing(store, control="none", threshold=threshold)
    if not rows:
        return None, ""
    plt = pyplot()
    panels = sorted({(r["model"], r["hook"], r["threshold"]) for r in rows})
    several_hooks = len({hook for _m, hook, _t in panels}) > 1
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (model, hook, t) in zip(axes[0], panels, strict=True):
        mine = rows.where(model=model, hook=hook, threshold=t)
        pairs = sorted({(r["from_step"], r["to_step"]) for r in mine})
        layers = sorted({r["layer"] for r in mine})
        grid = np.full((len(layers), len(pairs)), np.nan)
        for r in mine:
            value = np.nan if r["p_persist"] is None else r["p_persist"]
            grid[layers.index(r["layer"]), pairs.index((r["from_step"], r["to_step"]))] = value
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(pairs)), [f"{a}→{b}" for a, b in pairs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_title(f"{model}{', ' + hook if several_hooks else ''} (excess > {t})")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="p_persist")
    return save_figure(fig, out, "persistence.png"), render(rows, "table")


def _ablation_plot(store: Store, out: Path) -> tuple[str | None, str]:
    rows = queries.ablations_listing(store)
    if not rows:
        return None, ""
    deltas = queries.ablation_control_deltas(store)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.45 * len(rows)))
    for i, r in enumerate(rows):
        controls = deltas.get(r["ablation_id"], [])
        ax.plot(
            controls,
            [i - 0.15] * len(controls),
            "|",
            color="grey",
            ms=9,
            label="each random control" if i == 0 and controls else None,
        )
        if r["control_mean"] is not None and r["control_ci_low"] is not None:
            mean = r["control_mean"]
            ax.errorbar(
                mean,
                i - 0.15,
                xerr=[[mean - r["control_ci_low"]], [r["control_ci_high"] - mean]],
                fmt="s",
                color="black",
                ms=4,
                capsize=3,
                label="controls' mean (95% t-interval)" if i == 0 else None,
            )
        ax.plot(r["delta"], i + 0.15, "o", color="C3", label="ablated set" if i == 0 else None)
    labels = [_ablation_label(r) for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("Δ cross-entropy (nats)")
    ax.set_ylim(-0.8, len(rows) - 0.2)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3 - 0.1 / len(rows)), ncol=2)
    notes = [
        f"ablation {r['ablation_id']}: {r['n_controls']} controls cannot reach p < 0.05 (floor {r['p_floor']:.3f})"
        for r in rows
        if r["n_controls"] and r["n_controls"] < 19
    ]
    return save_figure(fig, out, "ablations.png"), render(rows, "table") + "".join(f"\n{n}" for n in notes)


def _ablation_label(r: dict) -> str:
    label = f"#{r['ablation_id']} {r['model']}@{r['step']} {r['method']} {r['selector'][:18]} ({r['n_neurons']})"
    if r["p_value"] is not None:
        label += f"\np = {r['p_value']:.3f} (floor {r['p_floor']:.3f} with {r['n_controls']} controls)"
    return label


SIMILARITY_METRICS = (
    ("excess_corr", "max-corr − rotation baseline"),
    ("matched_corr", "one-to-one matched corr"),
    ("cka", "linear CKA"),
)


def _similarity_plots(store: Store, out: Path) -> tuple[list[str], str]:
    """Heatmaps over (seed, step) x (seed, step) for each metric of the newest similarity run (diagonal
    measured), and one figure setting "same seed, other step" against "other seed, same step"."""
    try:
        rows = queries.similarity_listing(store)
    except ActdbError:
        return [], ""
    function = _function_rows(store, rows)
    metrics = list(SIMILARITY_METRICS) + ([("top1_agreement", "top-1 prediction agreement")] if function else [])
    values = {(r["model"], r["step"], r["other_model"], r["other_step"]): dict(r) for r in rows}
    for r in function:
        values.setdefault((r["model"], r["step"], r["other_model"], r["other_step"]), {})["top1_agreement"] = r[
            "top1_agreement"
        ]
    heatmaps = similarity_heatmaps(values, metrics, rows[0]["run_id"], out)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        same_seed = [v[metric] for (m, st, om, ost), v in values.items() if m == om and st != ost and v.get(metric)]
        same_step = [v[metric] for (m, st, om, ost), v in values.items() if m != om and st == ost and v.get(metric)]
        ax.boxplot([same_seed, same_step])
        ax.set_xticks([1, 2], ["same seed,\nother step", "other seed,\nsame step"], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Snapshots of one run against independently trained runs")
    contrast = save_figure(fig, out, "similarity_contrast.png")
    return [heatmaps, contrast], render(rows, "table")


def similarity_heatmaps(values: dict[tuple, dict], metrics: list[tuple[str, str]], run_id: int, out: Path) -> str:
    """One heatmap per metric over (seed, step) x (seed, step), two per row, ordered by seed then step. Cells
    are at least 0.4 inch and labels 8 pt whatever the number of sets, so a dozen sets stay readable; thin
    lines separate the seeds."""
    keys = sorted({k[:2] for k in values})
    labels = [f"{m}@{s}" for m, s in keys]
    plt = pyplot()
    n_cols = min(2, len(metrics))
    n_rows = -(-len(metrics) // n_cols)
    side = 1.6 + 0.4 * len(labels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * (side + 1.4), n_rows * side), squeeze=False)
    seed_edges = [i - 0.5 for i in range(1, len(keys)) if keys[i][0] != keys[i - 1][0]]
    for ax, (metric, title) in zip(axes.flat, metrics, strict=False):
        grid = np.full((len(keys), len(keys)), np.nan)
        for (m, st, om, ost), v in values.items():
            if v.get(metric) is not None:
                grid[keys.index((m, st)), keys.index((om, ost))] = v[metric]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for edge in seed_edges:
            ax.axhline(edge, color="white", lw=0.8)
            ax.axvline(edge, color="white", lw=0.8)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"Similarity of every pair of sets (run {run_id}; ordered by seed, then step)")
    return save_figure(fig, out, "similarity.png")


def _function_rows(store: Store, rows: Rows) -> Rows | list:
    """Function similarity of the run's checkpoints when all of them have stored predictions."""
    from actdb.compute.similarity.function import FunctionRequest, function_similarity
    from actdb.store.refs import SetRef

    refs = sorted({SetRef(r["model"], r["step"]) for r in rows}, key=lambda ref: (ref.model, ref.step))
    try:
        return function_similarity(store, FunctionRequest(sets=refs), log=lambda _m: None)
    except ActdbError:
        return []


def _trajectory_plots(store: Store, out: Path) -> tuple[list[str], str]:
    """The newest trajectory run: the win-rate matrix (seed-major, diverging colours centred at 0.5), Fort's
    disagreement-accuracy plane with its reference curves, the ensemble gain of the two kinds of pairs, the
    weight cosines, and the map with one line per seed."""
    from actdb.compute.trajectories.math import disagreement_references
    from actdb.query import trajectory_tables as tt

    try:
        rows = tt.long_rows(store)
    except ActdbError:
        return [], ""
    summary = tt.run_summary(store)
    points = tt.point_rows(store)
    plt = pyplot()
    images = []
    keys, win = tt.matrix(rows, "win_rate")
    labels = [f"{m}@{s}" for m, s in keys]
    reach = max(0.01, float(np.nanmax(np.abs(win - 0.5))))
    fig, ax = plt.subplots(figsize=(2.5 + 0.38 * len(keys), 1.8 + 0.34 * len(keys)))
    im = ax.imshow(win, cmap="RdBu_r", vmin=0.5 - reach, vmax=0.5 + reach)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("column checkpoint")
    fig.colorbar(im, ax=ax, fraction=0.046, label="win rate of row vs column")
    ax.set_title(
        f"Win rate W (eps {summary['eps']:g}; {summary['n_nontransitive']} of {summary['n_triples']} triples "
        f"non-transitive; ≥ {summary['n_targets']:,} targets per pair)",
        fontsize=8,
    )
    images.append(save_figure(fig, out, "trajectories_win_rate.png"))

    acc = {(r["model"], r["step"]): r["top1_accuracy"] for r in points}
    ref_model, _, ref_step = summary["reference"].rpartition("@")
    ref = (ref_model, int(ref_step))
    _, dis = tt.matrix(rows, "disagreement")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    grid = np.linspace(0.0, max(acc.values()) * 1.05 + 1e-9, 200)
    curves = disagreement_references(grid, acc[ref])
    for name, style, formula in (
        ("nested", ":", "|a − a₀|"),
        ("independent", "--", "e + e₀ − e·e₀"),
        ("disjoint", "-.", "min(1, e + e₀)"),
    ):
        ax.plot(grid, curves[name], style, color="grey", lw=1, label=f"{name} errors: d = {formula}")
    for model in sorted({k[0] for k in keys}):
        mine = [(k, acc[k]) for k in keys if k[0] == model and k != ref]
        d = [dis[keys.index(ref), keys.index(k)] for k, _ in mine]
        ax.plot([a for _, a in mine], np.array(d) / (1 - acc[ref]), "o", label=model)
    ax.plot([acc[ref]], [0], "k*", ms=10, label=f"reference {summary['reference']}")
    ax.set_xlabel("top-1 accuracy")
    ax.set_ylabel("disagreement with reference / (1 − reference accuracy)")
    ax.set_title("Diversity vs accuracy (Fort et al.)", fontsize=9)
    ax.legend(fontsize=6)
    images.append(save_figure(fig, out, "trajectories_disagreement.png"))

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    kinds = [
        [
            r["value"]
            for r in rows
            if r["metric"] == "ensemble_gain"
            and (r["model"], r["step"]) < (r["other_model"], r["other_step"])
            and tt.pair_kind(r["model"], r["step"], r["other_model"], r["other_step"]) == kind
        ]
        for kind in tt.KINDS
    ]
    ax.boxplot([k or [np.nan] for k in kinds])
    for i, values in enumerate(kinds, start=1):
        ax.plot(np.full(len(values), i), values, ".", color="C0", alpha=0.6)
    ax.set_xticks(
        [1, 2],
        ["\n".join(k.split(", ")) + f"\n({len(v)} pairs)" for k, v in zip(tt.KINDS, kinds, strict=True)],
        fontsize=7,
    )
    ax.set_ylabel("ensemble gain (nats)")
    ax.set_title("Mixture of two checkpoints: mean(ℓA, ℓB) − mixture loss", fontsize=8)
    images.append(save_figure(fig, out, "trajectories_ensemble_gain.png"))

    if summary["weights"]:
        fig, axes = plt.subplots(1, 2, figsize=(3.2 + 0.6 * len(keys), 1.8 + 0.3 * len(keys)), squeeze=False)
        for ax, (metric, title) in zip(
            axes[0],
            (("weight_cosine", "cos(θi, θj)"), ("weight_delta_cosine", "cos(θi − θ0, θj − θ0), within a seed")),
            strict=True,
        ):
            _, grid_w = tt.matrix(rows, metric)
            im = ax.imshow(grid_w, cmap="viridis", vmin=-1 if metric == "weight_cosine" else 0, vmax=1)
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
            ax.set_title(title, fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(
            "Weight space (across seeds θ − θ0 is not drawn: independent initialisations make it ≈ 0)", fontsize=8
        )
        images.append(save_figure(fig, out, "trajectories_weights.png"))

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for model in sorted({r["model"] for r in points}):
        mine = sorted((r["step"], r["map_x"], r["map_y"]) for r in points if r["model"] == model)
        line = ax.plot([m[1] for m in mine], [m[2] for m in mine], "-o", label=model)[0]
        for step, x, y in mine:
            ax.annotate(
                str(step), (x, y), fontsize=6, color=line.get_color(), xytext=(3, 3), textcoords="offset points"
            )
    stress = "" if summary["map_stress"] is None else f", stress-1 {summary['map_stress']:.3f}"
    ax.set_title(f"Trajectories: {summary['embedding']} of {summary['distance']}{stress}", fontsize=9)
    ax.legend(fontsize=7)
    images.append(save_figure(fig, out, "trajectories_map.png"))
    table = render(tt.kind_comparison(rows), "table") + "\n\n" + render(points, "table")
    return images, table


def build_report(
    store: Store,
    out: Path,
    threshold: float | None = None,
    concept_tables: dict[str, tuple[Rows, Rows]] | None = None,
) -> Path:
    """Write `index.html` and its PNGs into `out`; sections without data say which command produces them.
    `concept_tables`: `concept_table` results already computed by the caller, reused instead of recomputed."""
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

    hooks = queries.hooks_present(store) or [None]
    for hook in hooks:
        at = f" at {hook}" if len(hooks) > 1 else ""  # one hook: titles as before
        for control in ("none", "token"):
            img, table = _universal_by_layer_plot(store, out, control, threshold, hook)
            section(
                f"Universal neurons by layer ({control} control){at}",
                img,
                table,
                "no correlation run yet: `actdb correlate` (with `--control token` for the token control)",
            )
            section(
                f"Max correlation, rotation baseline and excess correlation ({control} control){at}",
                _excess_histogram(store, out, control, threshold, hook),
                missing="no correlation run yet",
            )
        top = universal_table(store, out, threshold, hook)
        if top:
            sections.append(
                f"<h2>Most universal neurons (none control){at}</h2><p>stability: share of baseline draws in which "
                f"the neuron is universal at the same threshold; each neuron links to its page</p>{top}"
            )
        counts = family_counts(store, threshold, hook)
        if counts:
            sections.append(
                f"<h2>Neuron families of universal neurons, per layer{at}</h2><pre>{html.escape(counts)}</pre>"
            )
        else:
            section(f"Neuron families{at}", None, missing="no explanations yet: `actdb examples MODEL@STEP`")
    img, table = _persistence_heatmap(store, out, threshold)
    flag = "" if threshold is None else f" --threshold {threshold}"
    section("Persistence across checkpoints", img, table, f"no persistence yet: `actdb persistence --model M{flag}`")
    img, table = _ablation_plot(store, out)
    section("Ablations against matched random controls", img, table, "no ablation yet: `actdb ablate`")
    images, table = _similarity_plots(store, out)
    if images:
        body = "".join(f'<img src="{i}" alt="similarity">' for i in images)
        body += f"<details><summary>table</summary><pre>{html.escape(table)}</pre></details>"
        sections.append(f"<h2>Similarity of seeds x steps</h2>{body}")
    else:
        section(
            "Similarity of seeds x steps",
            None,
            missing="no similarity run yet: `actdb similarity --models ... "
            "--steps ...` (and `actdb predictions` for the function side)",
        )
    images, table = _trajectory_plots(store, out)
    if images:
        body = "".join(f'<img src="{i}" alt="trajectories">' for i in images)
        body += f"<details><summary>table</summary><pre>{html.escape(table)}</pre></details>"
        sections.append(f"<h2>Trajectories: every checkpoint against every other</h2>{body}")
    else:
        section(
            "Trajectories: every checkpoint against every other",
            None,
            missing="no trajectory run yet: `actdb trajectories --models ... --steps ...` (after `actdb predictions`)",
        )
    from actdb.query.concept_report import concept_sections
    from actdb.query.robustness_report import robustness_section

    sections.extend(concept_sections(store, out, concept_tables))
    sections.append(robustness_section(store, out))
    page = out / "index.html"
    _write(
        page,
        f"""<!doctype html><html><head><meta charset="utf-8"><title>actdb report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}img{{max-width:100%}}
pre{{font-size:11px;overflow:auto}}.missing{{color:#888}}</style></head><body>
<h1>actdb report</h1><p>store {html.escape(str(store.config.home))}, generated {datetime.now():%Y-%m-%d %H:%M}</p>
{"".join(sections)}</body></html>""",
    )
    return page


def _write(page: Path, text: str) -> None:
    try:
        page.write_text(text)
    except OSError as exc:
        raise ActdbError(f"cannot write {page}: {exc.strerror or exc}") from None
