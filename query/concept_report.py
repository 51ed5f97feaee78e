"""The report's concept section: per concept set, the concept x concept similarity of each seed (last step), the
dendrogram of the first seed against the taxonomy, and experts across steps (Jaccard with the last step, count
above tau)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sqlalchemy import select

from actdb.compute.concepts import math as cm
from actdb.query.figures import pyplot, save_figure
from actdb.query.output import render
from actdb.store.database.connection import Rows, Store
from actdb.store.database.tables import concept_set
from actdb.store.errors import ActdbError


def concept_sections(store: Store, out: Path, tables: Mapping[str, tuple[Rows, Rows]] | None = None) -> list[str]:
    """HTML sections, one per concept set with complete runs (none when the store has no concept sets).
    `tables` holds `concept_table` results a caller has already computed (by set name; the demo prints them too),
    so their permutation tests run once."""
    from actdb.compute.concepts.analysis import concept_table, similarity_matrices

    names = store.query(select(concept_set.c.name).order_by(concept_set.c.id)).column("name")
    sections = []
    for name in names:
        try:
            concepts, runs = similarity_matrices(store, name)
            table, emergence = (tables or {}).get(name) or concept_table(store, name)
        except ActdbError:
            continue
        runs = [r for r in runs if r.pool == "max" and not r.masked]
        if not runs:
            continue
        plt = pyplot()
        labels = concepts.names
        last = max(r.step for r in runs)
        at_last = [r for r in runs if r.step == last]
        fig, axes = plt.subplots(1, len(at_last), figsize=(3.4 * len(at_last) + 0.6, 3.6), squeeze=False)
        for ax, r in zip(axes[0], at_last, strict=True):
            im = ax.imshow(r.similarity(), vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
            ax.set_title(f"{r.model}@{r.step}", fontsize=8)
        fig.colorbar(im, ax=axes[0][-1], shrink=0.7, label="Spearman of AP vectors")
        heat = save_figure(fig, out, f"concepts_{_safe(name)}_similarity.png")
        first = at_last[0]
        taxonomy = cm.taxonomy_similarity(labels, concepts.parents)
        tree = cm.dendrogram(first.similarity(), taxonomy)
        from scipy.cluster.hierarchy import dendrogram as draw

        fig, ax = plt.subplots(figsize=(6, 3.2))
        draw(tree.linkage, labels=labels, ax=ax, leaf_rotation=90, leaf_font_size=7)
        ax.set_ylabel("1 - similarity")
        ax.set_title(f"{first.model}@{first.step}: average linkage; cophenetic r with taxonomy {tree.cophenetic_r:.2f}")
        dend = save_figure(fig, out, f"concepts_{_safe(name)}_dendrogram.png")
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
        for model in sorted({r.model for r in runs}):
            mine = [r for r in runs if r.model == model]
            steps = [r.step for r in mine]
            jac = [np.mean([cm.jaccard(r.experts(c), mine[-1].experts(c)) for c in range(len(labels))]) for r in mine]
            count = [np.mean([(r.arrays.ap[c] > r.tau).sum() for c in range(len(labels))]) for r in mine]
            ax1.plot(steps, jac, marker="o", label=model)
            ax2.plot(steps, count, marker="o", label=model)
        ax1.set(xlabel="step", ylabel="Jaccard with last step", title="top-k experts", ylim=(0, 1.05))
        ax2.set(xlabel="step", ylabel="experts above tau (mean per concept)", title="AP > tau")
        ax1.legend(fontsize=7)
        steps_img = save_figure(fig, out, f"concepts_{_safe(name)}_steps.png")
        body = "".join(f'<img src="{i}" alt="concepts">' for i in (heat, dend, steps_img))
        body += (
            f"<pre>{html.escape(render(table))}</pre><details><summary>emergence</summary>"
            f"<pre>{html.escape(render(emergence))}</pre></details>"
        )
        sections.append(f"<h2>Concept experts: {html.escape(name)}</h2>{body}")
    return sections


def _safe(name: str) -> str:
    from actdb.store.config import file_name_of

    return file_name_of(name).replace("%", "_")
