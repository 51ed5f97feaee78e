"""What the explorer's pages show, read through the store's one read seam (Core tables and views, `queries`,
`listings`, `explanations`): plain rows and numbers, no HTML. Every function takes a read-only `Store`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, case, func, select, tuple_

from actdb.query import queries
from actdb.query.explanations import explanation_identity, file_contents, neuron_explanation, set_texts, token_label
from actdb.query.listings import dataset_rows
from actdb.store.database import tables
from actdb.store.database.connection import Rows, Store
from actdb.store.database.labels import newest_runs, on_newest, universal_condition
from actdb.store.database.registry import resolve_hook
from actdb.store.database.views import v_concept_experts, v_neuron_explanations, v_universality
from actdb.store.errors import ActdbError
from actdb.store.set_files import open_set
from actdb.store.token_text import readable

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 6  # tokens shown around a top activation
HISTOGRAM_BINS = 40
HISTOGRAM_TOKENS = 4_000_000  # the histogram reads at most this many tokens of the neuron's column (8-16 MB)
UNIVERSAL_SORTS = {
    "excess": lambda v: [v.c.excess_corr.desc().nulls_last()],
    "stability": lambda v: [v.c.stability.desc().nulls_last(), v.c.excess_corr.desc().nulls_last()],
    "max_corr": lambda v: [v.c.mean_max_corr.desc().nulls_last()],
    "layer": lambda v: [v.c.layer, v.c.neuron],
    "kurtosis": lambda v: [v.c.act_kurtosis.desc().nulls_last()],
}
UNIVERSAL_LIST_COLUMNS = [
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
    "n_draws",
    "family",
    "threshold",
]


class NotInStore(ActdbError):
    """The model, step, layer or neuron asked for is not in the store (a page answers 404)."""


def home_grid(store: Store) -> tuple[list[str], list[int], dict[tuple[str, int], dict[str, Any]]]:
    """Models × steps: per cell how many neurons were scored and how many are universal (excess correlation above
    the run's recorded threshold) in each set's canonical cross-model run without control (`newest_runs`: the
    widest, the newest among equals). Counted on the `universality` table itself, per set, then named: the view's
    joins cost seconds at paper scale."""
    u, r, a, c, m = tables.universality, tables.correlation_run, tables.activation_set, tables.checkpoint, tables.model
    newest = newest_runs("none")
    per_set = store.query(
        select(
            u.c.set_id,
            func.count().label("n_neurons"),
            func.sum(case((u.c.excess_corr > r.c.threshold, 1), else_=0)).label("n_universal"),
        )
        .join(newest, and_(u.c.run_id == newest.c.run_id, u.c.set_id == newest.c.set_id))
        .join(r, r.c.id == u.c.run_id)
        .group_by(u.c.set_id)
    )
    names = {
        x["id"]: (x["model"], x["step"])
        for x in store.query(
            select(a.c.id, m.c.name.label("model"), c.c.step)
            .join(c, c.c.id == a.c.checkpoint_id)
            .join(m, m.c.id == c.c.model_id)
        )
    }
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for row in per_set:
        cell = cells.setdefault(names[row["set_id"]], {"n_neurons": 0, "n_universal": 0})
        cell["n_neurons"] += row["n_neurons"]
        cell["n_universal"] += row["n_universal"] or 0
    models = queries.models_listing(store).column("model")
    steps = sorted(set(store.query(select(c.c.step).distinct()).column("step")) | {k[1] for k in cells})
    return models, steps, cells


def datasets(store: Store) -> Rows:
    return dataset_rows(store)


@dataclass(frozen=True)
class UniversalFilter:
    """The universal-neuron list's filters, sort and page (parsed and checked by the page)."""

    model: str | None = None
    step: int | None = None
    hook: str | None = None
    layer: int | None = None
    family: str | None = None
    min_excess: float | None = None
    max_excess: float | None = None
    min_stability: float | None = None
    sort: str = "excess"
    page: int = 1
    per_page: int = PAGE_SIZE


LISTED = [c for c in UNIVERSAL_LIST_COLUMNS if c != "family"]


def _universal_query(f: UniversalFilter) -> Select:
    """The filtered universal neurons (without their family: joining the explanations view to every row costs
    seconds at paper scale, so it is joined only to filter by family, and looked up for the rows shown)."""
    v, e = v_universality, v_neuron_explanations
    newest = newest_runs("none")
    query = (
        select(*(v.c[c] for c in LISTED), v.c.set_id)
        .join(newest, on_newest(v, newest))
        .where(universal_condition(None))
    )
    for column, value in (("model", f.model), ("step", f.step), ("hook", f.hook), ("layer", f.layer)):
        if value is not None:
            query = query.where(v.c[column] == value)
    if f.family:
        query = query.join(e, and_(e.c.set_id == v.c.set_id, e.c.layer == v.c.layer, e.c.neuron == v.c.neuron))
        query = query.where(e.c.family == f.family)
    if f.min_excess is not None:
        query = query.where(v.c.excess_corr >= f.min_excess)
    if f.max_excess is not None:
        query = query.where(v.c.excess_corr <= f.max_excess)
    if f.min_stability is not None:
        query = query.where(v.c.stability >= f.min_stability)
    return query


def _with_families(store: Store, rows: Rows) -> Rows:
    """`rows` with each neuron's family from `v_neuron_explanations` (blank where its set is not explained)."""
    e = v_neuron_explanations
    found: dict[tuple[int, int, int], str] = {}
    for set_id in {r["set_id"] for r in rows}:
        pairs = [(r["layer"], r["neuron"]) for r in rows if r["set_id"] == set_id]
        for start in range(0, len(pairs), 500):  # bounded IN lists
            query = select(e.c.layer, e.c.neuron, e.c.family).where(
                e.c.set_id == set_id, tuple_(e.c.layer, e.c.neuron).in_(pairs[start : start + 500])
            )
            found.update({(set_id, x["layer"], x["neuron"]): x["family"] for x in store.query(query)})
    out = [{**{c: r[c] for c in LISTED}, "family": found.get((r["set_id"], r["layer"], r["neuron"]))} for r in rows]
    return Rows(UNIVERSAL_LIST_COLUMNS, out, {**rows.types, "family": str})


def universal_page(store: Store, f: UniversalFilter) -> tuple[Rows, int]:
    """One page of universal neurons (each set's canonical run: the widest, then newest; its recorded threshold)
    and how many match the filters; sorting, filtering and paging happen in the database."""
    if f.sort not in UNIVERSAL_SORTS:
        raise ActdbError(f"unknown sort {f.sort!r}; use {', '.join(UNIVERSAL_SORTS)}")
    v = v_universality
    query = _universal_query(f)
    total = store.scalar(select(func.count()).select_from(query.subquery()))
    order = [*UNIVERSAL_SORTS[f.sort](v), v.c.model, v.c.step, v.c.layer, v.c.neuron]
    page = store.query(query.order_by(*order).limit(f.per_page).offset((f.page - 1) * f.per_page))
    return _with_families(store, page), total


def universal_all(store: Store, f: UniversalFilter) -> Rows:
    """Every row of the filtered list (for downloads), in the list's order."""
    v = v_universality
    order = [*UNIVERSAL_SORTS[f.sort](v), v.c.model, v.c.step, v.c.layer, v.c.neuron]
    return _with_families(store, store.query(_universal_query(f).order_by(*order)))


def checkpoint_shape(store: Store, model: str, step: int) -> tuple[int, int]:
    """(n_layers, d_mlp) of MODEL@STEP; an unknown checkpoint is an ActdbError (the page answers 404)."""
    shape = queries.checkpoint_shape(store, model, step)
    if shape is None:
        raise NotInStore(f"unknown checkpoint {model}@{step}")
    return shape.n_layers, shape.d_mlp


@dataclass
class NeuronPage:
    model: str
    step: int
    layer: int
    neuron: int
    hook: str | None
    story: dict[str, Rows]
    explained: dict[str, Rows]
    contexts: list[dict[str, Any]]
    histogram: tuple[list[int], list[float]] | None
    histogram_tokens: int
    steps: list[int]
    twins: list[dict[str, Any]]
    concepts: Rows


def _set_file(store: Store, model: str, step: int, hook: str | None) -> tuple[Any, Any] | None:
    """(activation set row, its explanation row or None) of the complete set of MODEL@STEP at `hook` whose file is
    on disk, or None."""
    a, c, m, d = tables.activation_set, tables.checkpoint, tables.model, tables.dataset
    found = store.query(
        select(
            a.c.id,
            a.c.path,
            a.c.hook,
            a.c.n_tokens,
            a.c.dtype,
            d.c.path.label("dataset_path"),
            d.c.name.label("dataset"),
        )
        .join(c, c.c.id == a.c.checkpoint_id)
        .join(m, m.c.id == c.c.model_id)
        .join(d, d.c.id == a.c.dataset_id)
        .where(m.c.name == model, c.c.step == step, a.c.status == "complete")
        .where(a.c.hook == hook if hook is not None else a.c.hook.isnot(None))
        .order_by(d.c.name)
        .limit(1)
    ).first()
    if found is None or not store.config.file(found.path).exists():
        return None
    ex = store.query(select(tables.set_explanation.c.path).where(tables.set_explanation.c.set_id == found.id)).first()
    return found, ex


def from_activation_file(
    store: Store, page_examples: Rows, model: str, step: int, hook: str | None, layer: int, neuron: int
) -> tuple[list[dict[str, Any]], tuple[list[int], list[float]] | None, int]:
    """What the neuron page reads from the set's activation file, opened once: each top-activating example as a
    run of tokens with this neuron's activation on every token, and the histogram of its activation over the
    counted tokens among the first `HISTOGRAM_TOKENS` (with how many it counted). Nothing when the file is gone."""
    import numpy as np

    found = _set_file(store, model, step, hook)
    if found is None:
        return [], None, 0
    aset, ex = found
    tokens = file_contents(store.config.file(aset.dataset_path), "tokens")
    texts = set_texts(store, aset.id, ex.path) if ex else []
    n_read = min(int(aset.n_tokens), HISTOGRAM_TOKENS)
    with open_set(store, aset) as reader:
        column = reader.read_neurons(layer, [neuron], 0, n_read)[:, 0].astype(np.float64)
        contexts = []
        for example in page_examples:
            seq, pos = int(example["sequence"]), int(example["position"])
            lo, hi = max(0, pos - CONTEXT_BEFORE), min(tokens.seq_len, pos + 1 + CONTEXT_AFTER)
            start = seq * tokens.seq_len
            if start + hi <= n_read:
                values = column[start + lo : start + hi]
            else:
                values = reader.read_neurons(layer, [neuron], start + lo, start + hi)[:, 0]
            ids = tokens.tokens[seq][lo:hi]
            contexts.append(
                {
                    "rank": example["rank"],
                    "activation": example["activation"],
                    "tokens": [
                        {"text": readable(token_label(texts, int(t))), "value": float(x), "peak": lo + k == pos}
                        for k, (t, x) in enumerate(zip(ids, values, strict=True))
                    ],
                }
            )
    counted = column[tokens.mask.reshape(-1)[:n_read] & np.isfinite(column)]
    if counted.size == 0:
        return contexts, None, 0
    counts, edges = np.histogram(counted, bins=HISTOGRAM_BINS)
    return contexts, (counts.tolist(), edges.tolist()), int(counted.size)


def twins(store: Store, story: dict[str, Rows], step: int) -> list[dict[str, Any]]:
    """The best match in every other model at the same step (newest run without control first, one row per
    model), with the excess of that match over its baseline, and the twin's own excess correlation and stability
    in its set's canonical cross-model run (the widest, then newest)."""
    seen, out = set(), []
    v = v_universality
    newest = newest_runs("none")
    for r in story["matches"]:
        if r["control"] != "none" or r["other_step"] != step or r["other_model"] in seen:
            continue
        seen.add(r["other_model"])
        base = r["baseline_max_corr"]
        own = store.query(
            select(v.c.excess_corr, v.c.stability, v.c.is_universal)
            .join(newest, on_newest(v, newest))
            .where(v.c.model == r["other_model"], v.c.step == step, v.c.hook == r["other_hook"])
            .where(v.c.layer == r["best_layer"], v.c.neuron == r["best_neuron"])
        ).first()
        out.append(
            dict(r)
            | {"excess": None if base is None or r["max_corr"] is None else r["max_corr"] - base}
            | {k: own[k] if own else None for k in ("excess_corr", "stability", "is_universal")}
        )
    return out


def model_steps(store: Store, model: str) -> list[int]:
    return store.query(
        select(tables.checkpoint.c.step)
        .join(tables.model, tables.model.c.id == tables.checkpoint.c.model_id)
        .where(tables.model.c.name == model)
        .order_by(tables.checkpoint.c.step)
    ).column("step")


def neuron_page(
    store: Store, model: str, step: int, layer: int, neuron: int, hook: str | None, examples: int = 8
) -> NeuronPage:
    """Everything the neuron page shows; an unknown checkpoint or neuron is an ActdbError."""
    n_layers, d_mlp = checkpoint_shape(store, model, step)
    if not (0 <= layer < n_layers and 0 <= neuron < d_mlp):
        raise NotInStore(f"neuron {layer}.{neuron} does not exist ({model} has {n_layers} layers x {d_mlp} neurons)")
    hook = resolve_hook(store, hook, model, step)
    story = queries.neuron_story(store, model, step, layer, neuron, hook)
    explained = neuron_explanation(store, model, step, layer, neuron, examples, hook=hook)
    contexts, histogram, counted = from_activation_file(store, explained["examples"], model, step, hook, layer, neuron)
    return NeuronPage(
        model,
        step,
        layer,
        neuron,
        hook,
        story,
        explained,
        contexts,
        histogram,
        counted,
        model_steps(store, model),
        twins(store, story, step),
        concepts_of(store, model, step, layer, neuron, hook),
    )


def concepts_of(store: Store, model: str, step: int, layer: int, neuron: int, hook: str | None) -> Rows:
    """The concepts this neuron is a top-k expert for, in every complete concept run of its set."""
    x = v_concept_experts
    query = select(x.c.concept_set, x.c.concept, x.c.rank, x.c.k, x.c.ap, x.c.auroc, x.c.pool, x.c.run_id).where(
        x.c.model == model, x.c.step == step, x.c.layer == layer, x.c.neuron == neuron
    )
    if hook is not None:
        query = query.where(x.c.hook == hook)
    return store.query(query.order_by(x.c.run_id.desc(), x.c.concept_set, x.c.rank))


@dataclass(frozen=True)
class SetTokens:
    """One explained set's token texts by their searchable form, and the top vocabulary token of each neuron."""

    set_id: int
    texts: list[str]
    by_text: dict[str, list[int]]
    vocab_ids: Any  # (layers, d_mlp) token id of the largest W_U · w_out, or None
    vocab_values: Any


def token_index(store: Store) -> list[SetTokens]:
    """Every explained set's `SetTokens` (read from the explanation files; the explorer keeps it per store
    generation, so a search reads no file)."""
    from actdb.store.files.explanation import read_explanation_group

    index = []
    for sx in store.query(select(tables.set_explanation.c.set_id, tables.set_explanation.c.path)):
        path = store.config.file(sx.path)
        if not path.exists():
            continue
        expected = explanation_identity(store, sx.set_id)
        texts = file_contents(path, "strings", expected)
        by_text: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            by_text.setdefault(readable(t).strip().lower(), []).append(i)
        try:
            voc = read_explanation_group(path, "vocabulary", expected)
            ids, values = voc["top_ids"][..., 0], voc["top_values"][..., 0]
        except ActdbError:
            ids, values = None, None
        index.append(SetTokens(sx.set_id, texts, by_text, ids, values))
    return index


def token_search(store: Store, text: str, index: list[SetTokens], limit: int = 200) -> Rows:
    """Explained neurons whose top token (the one they fire on most, by mean activation) reads as `text`
    (case-insensitive, surrounding spaces ignored), or whose strongest vocabulary token (W_U · w_out) does; each
    row says which."""
    import numpy as np

    wanted = text.strip().lower()
    if not wanted:
        raise ActdbError("type a token to search for")
    e = v_neuron_explanations
    columns = [e.c.model, e.c.step, e.c.hook, e.c.layer, e.c.neuron, e.c.top_token, e.c.top_token_mean, e.c.family]
    rows = []
    for st in index:
        ids = st.by_text.get(wanted)
        if not ids:
            continue
        query = select(*columns).where(e.c.set_id == st.set_id, e.c.top_token.in_(ids))
        for r in store.query(query.order_by(e.c.top_token_mean.desc()).limit(limit)):
            token = readable(st.texts[r["top_token"]])
            rows.append(dict(r) | {"token": token, "how": "fires on", "value": r["top_token_mean"]})
        if st.vocab_ids is None:
            continue
        layers, neurons = np.nonzero(np.isin(st.vocab_ids, ids))
        order = np.argsort(-st.vocab_values[layers, neurons], kind="stable")[:limit]
        pairs = [(int(layers[k]), int(neurons[k])) for k in order]
        if not pairs:
            continue
        found = store.query(select(*columns).where(e.c.set_id == st.set_id, tuple_(e.c.layer, e.c.neuron).in_(pairs)))
        for r in found:
            layer, n = r["layer"], r["neuron"]
            token = readable(st.texts[int(st.vocab_ids[layer, n])])
            rows.append(dict(r) | {"token": token, "how": "predicts", "value": float(st.vocab_values[layer, n])})
    rows.sort(key=lambda r: -(r["value"] or 0.0))
    names = ["model", "step", "hook", "layer", "neuron", "how", "token", "value", "family"]
    return Rows(names, [{c: r.get(c) for c in names} for r in rows[:limit]])
