"""Report pages of universal neurons: the universal table linked to one page per neuron (its contexts with the
maximum highlighted, token table, vocabulary extremes, excess across steps, matches in other seeds), and the
family counts per layer."""

from __future__ import annotations

import html
from pathlib import Path

from actdb.query import queries
from actdb.query.explanations import families, neuron_explanation
from actdb.query.output import cell, render
from actdb.store.config import file_name_of
from actdb.store.database.connection import Rows, Store
from actdb.store.errors import ActdbError
from actdb.store.refs import examples_command

TABLE_COLUMNS = (
    "model",
    "step",
    "hook",
    "layer",
    "neuron",
    "excess_corr",
    "stability",
    "z",
    "mean_max_corr",
    "mean_baseline",
)
STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;font-size:12px}
td,th{border-bottom:1px solid #ddd;padding:2px 6px;text-align:right}td.text{text-align:left;font-family:monospace;
white-space:pre}mark{background:#fd4;font-weight:bold}"""


def html_table(rows: Rows, text_columns: tuple[str, ...] = (), links: dict[int, str] | None = None) -> str:
    """Rows as an HTML table; `links` maps a row index to the page its first cell links to."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows.columns)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, c in enumerate(rows.columns):
            text = html.escape(cell(r[c]))
            if j == 0 and links and i in links:
                text = f'<a href="{html.escape(links[i])}">{text}</a>'
            cls = ' class="text"' if c in text_columns else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def page_name(model: str, step: int, layer: int, neuron: int, hook: str | None = None) -> str:
    at = "" if hook in (None, "mlp.post") else f"-{hook}"
    return f"neurons/{file_name_of(model)}@{step}-{layer}.{neuron}{at}.html"


def universal_table(store: Store, out: Path, threshold: float | None, hook: str | None = None, limit: int = 25) -> str:
    """The most universal neurons at one hook as an HTML table, each linked to its page (written into
    `out/neurons`); each page's best matches in other sets link to their own pages, which are written too (one
    hop)."""
    try:
        rows = queries.universal_neurons(store, threshold=threshold, limit=limit, hook=hook)
    except ActdbError:
        return ""
    (out / "neurons").mkdir(exist_ok=True)
    pages: dict[str, dict] = {}
    stories = {}
    links = {}
    for i, r in enumerate(rows):
        name = page_name(r["model"], r["step"], r["layer"], r["neuron"], r["hook"])
        pages[name], links[i] = dict(r), name
        stories[name] = queries.neuron_story(store, r["model"], r["step"], r["layer"], r["neuron"], r["hook"])
    for name in list(pages):
        for m in stories[name]["matches"]:
            if m["best_layer"] is None or m["best_neuron"] is None:
                continue
            twin = {"model": m["other_model"], "step": m["other_step"], "layer": m["best_layer"]}
            twin["neuron"], twin["hook"] = m["best_neuron"], m["other_hook"]
            pages.setdefault(page_name(twin["model"], twin["step"], twin["layer"], twin["neuron"], twin["hook"]), twin)
    for name, row in pages.items():
        (out / name).write_text(_neuron_page(store, row, set(pages), stories.get(name)))
    return html_table(Rows(list(TABLE_COLUMNS), rows), links=links)


def _matches_table(matches: Rows, pages: set[str]) -> str:
    """The best matches in other sets, each twin (other set's best neuron) named first and linked to its page."""
    rows, links = [], {}
    for i, r in enumerate(matches):
        twin = f"{r['other_model']}@{r['other_step']} {cell(r['best_layer'])}.{cell(r['best_neuron'])}"
        rows.append({"twin": twin, **dict(r)})
        if r["best_layer"] is not None and r["best_neuron"] is not None:
            name = page_name(r["other_model"], r["other_step"], r["best_layer"], r["best_neuron"])
            if name in pages:
                links[i] = Path(name).name  # pages sit side by side in neurons/
    return html_table(Rows(["twin", *matches.columns], rows), links=links)


def _contexts(rows: Rows) -> str:
    items = []
    for r in rows:
        text = (
            html.escape(r["before"]) + "<mark>" + html.escape(r["token"]) + "</mark>" + html.escape(r["after"])
        ).replace("\n", "⏎")
        items.append(f"<tr><td>{r['rank']}</td><td>{r['activation']:.4g}</td><td class=text>{text}</td></tr>")
    return "<table><tr><th>rank</th><th>activation</th><th>context</th></tr>" + "".join(items) + "</table>"


def _neuron_page(store: Store, row: dict, pages: set[str], story: dict[str, Rows] | None = None) -> str:
    """A neuron's page; `row` carries its universality when it is one of the listed neurons (a twin's page
    shows its newest run's instead), `pages` the pages the report writes (matches link to those)."""
    model, step, layer, neuron, hook = row["model"], row["step"], row["layer"], row["neuron"], row["hook"]
    story = story or queries.neuron_story(store, model, step, layer, neuron, hook)
    title = f"{model}@{step} neuron {layer}.{neuron} ({hook})"
    scored = row if "excess_corr" in row else (story["universality"].first() or {})
    summary = (
        f"excess corr {cell(scored.get('excess_corr'))}, stability {cell(scored.get('stability'))} "
        f"(threshold {cell(scored.get('threshold'))})"
        if scored
        else "not scored by a correlation run"
    )
    parts = [f"<h1>{html.escape(title)}</h1><p><a href='../index.html'>report</a> · {html.escape(summary)}</p>"]
    explained = neuron_explanation(store, model, step, layer, neuron, examples=20, pieces=True, hook=hook)
    if explained["explanation"]:
        parts.append("<h2>Explanation</h2>" + html_table(explained["explanation"]))
        parts.append("<h2>Max-activating contexts</h2>" + _contexts(explained["examples"]))
        parts.append(
            "<h2>Tokens with the highest mean activation</h2>"
            + html_table(explained["top_tokens"], text_columns=("token",))
        )
        if explained["vocabulary"]:
            parts.append(
                "<h2>Vocabulary: tokens its output weights raise and lower (W_U w_out)</h2>"
                + html_table(explained["vocabulary"], text_columns=("top_token", "bottom_token"))
            )
    else:
        build = examples_command(f"{model}@{step}", hook=hook)
        parts.append(f"<p>not explained yet: <code>{html.escape(build)}</code></p>")
    parts.append("<h2>Excess correlation across steps</h2>" + html_table(story["history"]))
    parts.append("<h2>Best matches in other sets</h2>" + _matches_table(story["matches"], pages))
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


def family_counts(store: Store, threshold: float | None, hook: str | None = None) -> str:
    """Family counts per layer of every explained (model, step) with universal neurons at one hook, and the rules
    used."""
    try:
        rows = queries.universal_neurons(store, threshold=threshold, hook=hook)
    except ActdbError:
        return ""
    out, rules = [], set()
    for model, step in sorted({(r["model"], r["step"]) for r in rows}):
        try:
            _neurons, counts, rule = families(store, model=model, step=step, threshold=threshold, hook=hook)
        except ActdbError:
            continue
        rules.update(rule)
        out += [{"model": model, "step": step, "hook": hook, **dict(c)} for c in counts]
    if not out:
        return ""
    table = render(Rows(list(out[0]), out), "table")
    return "\n".join(f"rule ({r})" for r in sorted(rules)) + "\n" + table
