"""The explorer's pages: one handler per route, each parsing its parameters (a malformed one is a 400 page, an
unknown model, step, layer or neuron a 404 page), reading through `reads` and the canned queries, and rendering a
template, or a CSV/Parquet download when `?format=` asks for one."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from actdb.query import queries
from actdb.query.output import cell
from actdb.query.serve import charts, reads
from actdb.query.serve.downloads import download
from actdb.query.serve.site import Site
from actdb.query.sql_console import DEFAULT_TIMEOUT, ReadonlyQuery
from actdb.query.text_activations import MAX_CHECKPOINTS, MAX_TEXT_CHARS, Probe, text_activations
from actdb.store.database.connection import Rows
from actdb.store.database.labels import FAMILIES
from actdb.store.errors import ActdbError, first_line
from actdb.store.hook_names import HOOKS, parse_hook
from actdb.store.refs import parse_neuron, parse_set_ref

SQL_SHOWN_ROWS = 1000  # the page shows this many rows; its CSV download has the door's own caps
SHADES = 9


# --- template filters ---


def neuron_url(model: str, step: int, layer: int, neuron: int, hook: str | None = None) -> str:
    """The stable address of one neuron's page (`mlp.post`, the default hook, stays out of it)."""
    from urllib.parse import quote

    url = f"/neuron/{quote(model, safe='')}@{step}/{layer}.{neuron}"
    return url + (f"?hook={quote(hook)}" if hook and hook != "mlp.post" else "")


def shade(value: float | None, top: float) -> str:
    """A CSS class for an activation relative to `top`: a0..a9 for positive, n1..n9 for negative values."""
    if value is None or not math.isfinite(value) or top <= 0:
        return "a0"
    level = min(SHADES, round(SHADES * abs(value) / top))
    return f"a{level}" if value >= 0 else f"n{level}"


FILTERS: dict[str, Callable[..., Any]] = {"cell": cell, "neuron_url": neuron_url, "shade": shade}


# --- parameters ---


def _bad(message: str) -> HTTPException:
    return HTTPException(400, message)


def _int(request: Request, name: str, low: int = 0, high: int = 2**62) -> int | None:
    text = request.query_params.get(name, "").strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise _bad(f"malformed {name} {text!r}; write a whole number in {low}..{high}")
    return int(text)


def _float(request: Request, name: str, low: float = -1.0, high: float = 1.0) -> float | None:
    text = request.query_params.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _bad(f"malformed {name} {text!r}; write a number in [{low:g}, {high:g}]") from None
    if not low <= value <= high:
        raise _bad(f"{name} {text!r} is outside [{low:g}, {high:g}]")
    return value


def _text(request: Request, name: str, max_chars: int = 200) -> str | None:
    text = request.query_params.get(name, "").strip()
    if len(text) > max_chars:
        raise _bad(f"{name} is {len(text)} characters; at most {max_chars}")
    return text or None


def _hook(request: Request) -> str | None:
    text = _text(request, "hook")
    try:
        return parse_hook(text) if text else None
    except ActdbError as exc:
        raise _bad(str(exc)) from None


def _format(request: Request) -> str | None:
    fmt = request.query_params.get("format")
    if fmt not in (None, "csv", "parquet"):
        raise _bad(f"unknown format {fmt!r}; use csv or parquet")
    return fmt


def _neuron_address(request: Request) -> tuple[str, int, int, int]:
    try:
        ref = parse_set_ref(request.path_params["ref"])
        layer, neuron = parse_neuron(request.path_params["cell"])
    except ActdbError as exc:
        raise _bad(str(exc)) from None
    if ref.dataset:
        raise _bad("a neuron's address is MODEL@STEP/LAYER.NEURON")
    return ref.model, ref.step, layer, neuron


def _reading(call: Callable[[], Any]) -> Any:
    """Run a read; what the store says is not there is a 404, any other refusal a 400, both in its one line."""
    try:
        return call()
    except reads.NotInStore as exc:
        raise HTTPException(404, str(exc)) from None
    except ActdbError as exc:
        raise HTTPException(400, first_line(exc)) from None


def _downloadable(request: Request, rows: Rows, name: str) -> Response | None:
    fmt = _format(request)
    return download(rows, name, fmt) if fmt else None


def _links(request: Request) -> dict[str, str]:
    """This page's address with format=csv and format=parquet."""
    params = {k: v for k, v in request.query_params.items() if k not in ("format", "page")}
    return {fmt: f"{request.url.path}?{urlencode(params | {'format': fmt})}" for fmt in ("csv", "parquet")}


# --- pages ---


HOME_RUN_COLUMNS = ("run_id", "kind", "status", "dataset", "control", "hook", "n_sets", "n_tokens", "seconds")
HOME_RUNS = 10  # the newest runs on the home page; every run and column is on /runs


def home(site: Site, request: Request) -> Response:
    models, steps, grid = site.cached("grid", lambda: reads.home_grid(site.store))
    runs = site.cached("runs", lambda: queries.runs_listing(site.store))
    newest = Rows.from_tuples(
        HOME_RUN_COLUMNS, [tuple(r[c] for c in HOME_RUN_COLUMNS) for r in list(runs)[::-1][:HOME_RUNS]]
    )
    datasets = site.cached("datasets", lambda: reads.datasets(site.store))
    return HTMLResponse(
        site.render(
            "home.html",
            models=models,
            steps=steps,
            grid=grid,
            runs=newest,
            n_runs=len(runs),
            datasets=datasets,
            store=site.store.config,
        )
    )


def neuron(site: Site, request: Request) -> Response:
    model, step, layer, index = _neuron_address(request)
    hook = _hook(request)
    fmt = _format(request)
    table = request.query_params.get("table")
    if fmt and table not in NEURON_TABLES:
        raise _bad(f"name the table to download: table={' or table='.join(NEURON_TABLES)}")
    page = _reading(lambda: reads.neuron_page(site.store, model, step, layer, index, hook))
    if fmt:
        rows = {**page.story, **page.explained, "concepts": page.concepts}[table]
        return download(rows, f"{model}@{step}-{layer}.{index}-{table}", fmt)
    links = {
        t: {f: f"?{urlencode({**request.query_params, 'table': t, 'format': f})}" for f in ("csv", "parquet")}
        for t in NEURON_TABLES
    }
    return HTMLResponse(site.render("neuron.html", p=page, charts=_neuron_charts(page), request=request, links=links))


NEURON_TABLES = (
    "statistics",
    "universality",
    "matches",
    "history",
    "self_correlation",
    "ablations",
    "explanation",
    "examples",
    "top_tokens",
    "vocabulary",
    "concepts",
)


def _neuron_charts(page: reads.NeuronPage) -> dict[str, Any]:
    """The histogram, and over steps: this neuron's excess correlation and its self-correlation with this step."""
    out: dict[str, Any] = {}
    if page.histogram:
        label = f"activation over {page.histogram_tokens:,} counted tokens (log counts)"
        out["histogram"] = charts.histogram(*page.histogram, label)
    history = [r for r in page.story["history"] if r["control"] == "none"]
    by_step = {r["step"]: r["excess_corr"] for r in history}
    self_corr: dict[int, float] = {page.step: 1.0}
    for r in page.story["self_correlation"]:
        if r["control"] != "none":
            continue
        if r["from_step"] == page.step:
            self_corr[r["to_step"]] = r["self_corr"]
        elif r["to_step"] == page.step:
            self_corr[r["from_step"]] = r["self_corr"]
    links = {s: neuron_url(page.model, s, page.layer, page.neuron, page.hook) for s in page.steps}
    series = []
    for name, values in (("excess corr", by_step), (f"self corr with step {page.step}", self_corr)):
        steps = sorted(values)
        if steps:
            series.append(charts.Series(name, [(s, values[s]) for s in steps], [links.get(s) for s in steps]))
    if series:
        out["steps"] = charts.line_chart(series, "step", "value")
    out["self_corr"] = self_corr
    out["excess_by_step"] = by_step
    return out


def try_text(site: Site, request: Request) -> Response:
    model, step, layer, index = _neuron_address(request)
    hook = _hook(request)
    text = request.query_params.get("text", "").replace("\r\n", "\n")  # a form's textarea sends CRLF
    if len(text) > MAX_TEXT_CHARS:
        raise _bad(f"the text has {len(text)} characters; at most {MAX_TEXT_CHARS} are run")
    page = _reading(lambda: reads.neuron_page(site.store, model, step, layer, index, hook, examples=0))
    probes = [Probe(model, step, layer, index)]
    probes += [Probe(t["other_model"], step, t["best_layer"], t["best_neuron"]) for t in page.twins]
    probes += [Probe(model, s, layer, index) for s in page.steps if s != step]
    probes = probes[:MAX_CHECKPOINTS]
    error, rows = None, None
    if text.strip():
        try:
            rows = text_activations(site.store, probes, text, site.loaded, page.hook)
        except ActdbError as exc:
            error = first_line(exc)
    top = max((abs(r[p.label]) for r in rows or [] for p in probes if math.isfinite(r[p.label])), default=0.0)
    status = 400 if error else 200
    return HTMLResponse(
        site.render(
            "try.html", p=page, text=text, rows=rows, probes=probes, top=top, error=error, max_chars=MAX_TEXT_CHARS
        ),
        status_code=status,
    )


def universal(site: Site, request: Request) -> Response:
    f = reads.UniversalFilter(
        model=_text(request, "model"),
        step=_int(request, "step"),
        hook=_hook(request),
        layer=_int(request, "layer", 0, 100_000),
        family=_text(request, "family"),
        min_excess=_float(request, "min_excess"),
        max_excess=_float(request, "max_excess"),
        min_stability=_float(request, "min_stability", 0.0, 1.0),
        sort=request.query_params.get("sort", "excess"),
        page=_int(request, "page", 1) or 1,
        per_page=_int(request, "per_page", 1, reads.MAX_PAGE_SIZE) or reads.PAGE_SIZE,
    )
    if f.sort not in reads.UNIVERSAL_SORTS:
        raise _bad(f"unknown sort {f.sort!r}; use {', '.join(reads.UNIVERSAL_SORTS)}")
    if _format(request):
        return _downloadable(request, _reading(lambda: reads.universal_all(site.store, f)), "universal")
    rows, total = site.cached(("universal", f), lambda: _reading(lambda: reads.universal_page(site.store, f)))
    pages = max(1, math.ceil(total / f.per_page))
    params = {k: v for k, v in request.query_params.items() if k != "page"}
    nav = {
        "prev": f"?{urlencode(params | {'page': f.page - 1})}" if f.page > 1 else None,
        "next": f"?{urlencode(params | {'page': f.page + 1})}" if f.page < pages else None,
    }
    sort_links = {s: f"?{urlencode(params | {'sort': s, 'page': 1})}" for s in reads.UNIVERSAL_SORTS}
    return HTMLResponse(
        site.render(
            "universal.html",
            rows=rows,
            total=total,
            f=f,
            pages=pages,
            nav=nav,
            sort_links=sort_links,
            models=site.cached("models", lambda: queries.models_listing(site.store).column("model")),
            families=FAMILIES,
            hooks=HOOKS,
            downloads=_links(request),
        )
    )


def search(site: Site, request: Request) -> Response:
    token = _text(request, "token")
    rows = None
    if token:
        index = site.cached("token-index", lambda: reads.token_index(site.store))
        rows = site.cached(("search", token), lambda: _reading(lambda: reads.token_search(site.store, token, index)))
    if rows is not None and (got := _downloadable(request, rows, "search")):
        return got
    return HTMLResponse(site.render("search.html", token=token or "", rows=rows, downloads=_links(request)))


def _listing(name: str, title: str, read: Callable[[Site], Rows]) -> Callable[[Site, Request], Response]:
    def page(site: Site, request: Request) -> Response:
        rows = site.cached(name, lambda: _reading(lambda: read(site)))
        if got := _downloadable(request, rows, name):
            return got
        return HTMLResponse(site.render("listing.html", title=title, rows=rows, downloads=_links(request)))

    return page


SIMILARITY_METRICS = ("excess_corr", "mean_max_corr", "matched_corr", "cka")


def similarity(site: Site, request: Request) -> Response:
    metric = request.query_params.get("metric", "excess_corr")
    if metric not in SIMILARITY_METRICS:
        raise _bad(f"unknown metric {metric!r}; use {', '.join(SIMILARITY_METRICS)}")
    rows = site.cached("similarity", lambda: _reading(lambda: queries.similarity_listing(site.store)))
    if got := _downloadable(request, rows, "similarity"):
        return got
    sets = {(r["model"], r["step"]) for r in rows} | {(r["other_model"], r["other_step"]) for r in rows}
    labels = [f"{model}@{step}" for model, step in sorted(sets)]  # by model, then step in numbers
    where = {label: i for i, label in enumerate(labels)}
    values, links = {}, {}
    for r in rows:
        a, b = f"{r['model']}@{r['step']}", f"{r['other_model']}@{r['other_step']}"
        for i, j in ((where[a], where[b]), (where[b], where[a])):
            values[(i, j)] = r[metric]
            links[(i, j)] = f"/similarity/pair?{urlencode({'a': a, 'b': b})}"
    heat = charts.heatmap(labels, values, links)
    return HTMLResponse(
        site.render(
            "similarity.html",
            heat=heat,
            metric=metric,
            metrics=SIMILARITY_METRICS,
            rows=rows,
            downloads=_links(request),
        )
    )


def similarity_pair(site: Site, request: Request) -> Response:
    try:
        a, b = parse_set_ref(request.query_params.get("a", "")), parse_set_ref(request.query_params.get("b", ""))
    except ActdbError as exc:
        raise _bad(str(exc)) from None
    every = _reading(lambda: queries.similarity_listing(site.store, by_layer=True))
    rows = Rows(
        every.columns,
        [
            r
            for r in every
            if {(r["model"], r["step"]), (r["other_model"], r["other_step"])} == {(a.model, a.step), (b.model, b.step)}
        ],
        every.types,
    )
    if not rows:
        raise HTTPException(404, f"no similarity of {a} with {b} in the newest similarity run")
    if got := _downloadable(request, rows, "similarity_pair"):
        return got
    return HTMLResponse(
        site.render("listing.html", title=f"Layer similarity: {a} vs {b}", rows=rows, downloads=_links(request))
    )


def persistence(site: Site, request: Request) -> Response:
    rows = site.cached("persistence", lambda: _reading(lambda: queries.persistence_listing(site.store, control="none")))
    if got := _downloadable(request, rows, "persistence"):
        return got
    plots = []
    groups = sorted({(r["model"], r["hook"]) for r in rows})
    several_hooks = len({hook for _m, hook in groups}) > 1
    for model, hook in groups:
        pair = []
        of_group = [r for r in rows if r["model"] == model and r["hook"] == hook]
        for metric, label in (("p_persist", "P(persist)"), ("mean_self_corr", "mean self-correlation")):
            series = []
            for layer in sorted({r["layer"] for r in of_group}):
                mine = sorted((r for r in of_group if r["layer"] == layer), key=lambda r: r["to_step"])
                points = [(r["to_step"], r[metric]) for r in mine]
                links = [
                    f"/universal?{urlencode({'model': model, 'step': r['to_step'], 'layer': layer, 'hook': hook})}"
                    for r in mine
                ]
                series.append(charts.Series(f"layer {layer}", points, links))
            pair.append(charts.line_chart(series, "step (to)", label, y_max=1.0))
        plots.append((f"{model} ({hook})" if several_hooks else model, pair))
    return HTMLResponse(site.render("persistence.html", plots=plots, rows=rows, downloads=_links(request)))


def sql(site: Site, request: Request) -> Response:
    statement = request.query_params.get("q", "")
    fmt = _format(request)
    error, rows, notice = None, None, None
    if statement.strip():
        try:
            with ReadonlyQuery(
                site.store.config, statement, DEFAULT_TIMEOUT, max_rows=None if fmt else SQL_SHOWN_ROWS
            ) as result:
                rows = Rows.from_tuples(result.columns, list(result))
            notice = result.notice
        except ActdbError as exc:
            error = first_line(exc)
    if fmt and rows is not None:
        return download(rows, "sql", fmt)
    html = site.render(
        "sql.html",
        statement=statement,
        rows=rows,
        error=error,
        notice=notice,
        relations=site.relations,
        timeout=DEFAULT_TIMEOUT,
        shown=SQL_SHOWN_ROWS,
        downloads=_links(request),
    )
    return HTMLResponse(html, status_code=400 if error else 200)


def warm_caches(site: Site) -> None:
    """Read the whole-store results the first visitor would otherwise wait for (the home grid, the first page
    of universal neurons, the token index); run in a background thread at start. A failure is logged, not
    raised: the page that needs it reports it then."""
    import logging

    try:
        site.cached("grid", lambda: reads.home_grid(site.store))
        site.cached("runs", lambda: queries.runs_listing(site.store))
        site.cached(
            ("universal", reads.UniversalFilter()), lambda: reads.universal_page(site.store, reads.UniversalFilter())
        )
        site.cached("token-index", lambda: reads.token_index(site.store))
    except Exception as exc:  # a warm-up: the page that needs the result reports its own error
        logging.getLogger("actdb.serve").warning("warming the caches failed: %s", first_line(exc))


def bind(site: Site, handler: Callable[[Site, Request], Response]) -> Callable[[Request], Response]:
    """A route endpoint for `handler` (a plain function: Starlette runs it in its thread pool)."""

    @functools.wraps(handler)
    def endpoint(request: Request) -> Response:
        return handler(site, request)

    return endpoint


ROUTES: list[tuple[str, Callable[[Site, Request], Response], str]] = [
    ("/", home, "home"),
    ("/neuron/{ref}/{cell}", neuron, "neuron"),
    ("/neuron/{ref}/{cell}/try", try_text, "try"),
    ("/universal", universal, "universal"),
    ("/search", search, "search"),
    ("/runs", _listing("runs", "Correlation runs", lambda s: queries.runs_listing(s.store)), "runs"),
    ("/ablations", _listing("ablations", "Ablations", lambda s: queries.ablations_listing(s.store)), "ablations"),
    ("/similarity", similarity, "similarity"),
    ("/similarity/pair", similarity_pair, "similarity_pair"),
    ("/persistence", persistence, "persistence"),
    ("/sql", sql, "sql"),
]
