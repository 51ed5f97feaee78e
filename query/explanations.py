"""Reading explanations: a neuron's max-activating contexts (decoded from the token texts stored with them), its
token and vocabulary tables, and the families of universal neurons by the rule `v_neuron_explanations` applies."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, Row, literal, select, true

from actdb.query.queries import check_neuron
from actdb.store.database import tables
from actdb.store.database.connection import Rows, Store
from actdb.store.database.labels import FAMILIES, family_rule, newest_runs, on_newest, stability_at, universal_condition
from actdb.store.database.registry import get_checkpoint, resolve_hook
from actdb.store.database.views import v_neuron_explanations, v_universality
from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME
from actdb.store.refs import check_threshold, examples_command
from actdb.store.token_text import quoted, readable

if TYPE_CHECKING:
    from actdb.store.files.identity import SidecarIdentity

BEFORE, AFTER = 10, 4  # tokens of context shown around a maximum
MARK = ("«", "»")  # around the maximum's token in a context
EXPLANATION_COLUMNS = (
    "dataset",
    "hook",
    "max_activation",
    "token_r2",
    "token_r2_chance",
    "position_r2",
    "position_r2_chance",
    "vocab_mean",
    "vocab_var",
    "vocab_skew",
    "vocab_kurtosis",
    "vocab_label",
    "family",
)
FAMILY_COLUMNS = (
    "model",
    "step",
    "hook",
    "layer",
    "neuron",
    "family",
    "excess_corr",
    "stability",
    "token_r2",
    "position_r2",
    "top_token",
    "token",
    "vocab_skew",
    "vocab_kurtosis",
    "threshold",
)


def _explained_sets(
    store: Store, model: str, step: int, hook: str | None = None
) -> list[tuple[Row[Any], str, str, str]]:
    """(explanation row, activation path, dataset name, dataset path) of every explained set of MODEL@STEP at
    `hook` (None: at any)."""
    with store.transaction() as conn:
        get_checkpoint(conn, model, step)
        rows = conn.execute(
            select(
                tables.set_explanation,
                tables.activation_set.c.path.label("activation_path"),
                tables.dataset.c.name.label("dataset_name"),
                tables.dataset.c.path.label("dataset_path"),
            )
            .join(tables.activation_set, tables.activation_set.c.id == tables.set_explanation.c.set_id)
            .join(tables.dataset, tables.dataset.c.id == tables.activation_set.c.dataset_id)
            .join(tables.checkpoint, tables.checkpoint.c.id == tables.activation_set.c.checkpoint_id)
            .join(tables.model, tables.model.c.id == tables.checkpoint.c.model_id)
            .where(tables.model.c.name == model, tables.checkpoint.c.step == step)
            .where(tables.activation_set.c.hook == hook if hook is not None else true())
            .order_by(tables.dataset.c.name)
        ).all()
    return [(r, r.activation_path, r.dataset_name, r.dataset_path) for r in rows]


def unexplained_sets(store: Store, model: str, step: int, hook: str | None) -> list[str]:
    """One line for each complete set of MODEL@STEP at `hook` (None: at any) that has no explanation, naming the
    `actdb examples` command that builds it: what `actdb neuron` says instead of empty explanation tables."""
    a, x, d = tables.activation_set, tables.set_explanation, tables.dataset
    with store.transaction() as conn:
        ckpt = get_checkpoint(conn, model, step)
        rows = conn.execute(
            select(a.c.hook, d.c.name.label("dataset"), x.c.set_id.label("explained"))
            .join(d, d.c.id == a.c.dataset_id)
            .outerjoin(x, x.c.set_id == a.c.id)
            .where(a.c.checkpoint_id == ckpt.id, a.c.status == "complete")
            .where(a.c.hook == hook if hook is not None else true())
            .order_by(d.c.name, a.c.hook)
        ).all()
    several = len({r.dataset for r in rows}) > 1  # `actdb examples` then needs --dataset
    target = f"{model}@{step}"
    return [
        f"{target} on {r.dataset} ({r.hook}) is not explained; "
        f"`{examples_command(target, r.dataset if several else None, r.hook)}` explains it"
        for r in rows
        if r.explained is None
    ]


def neuron_explanation(
    store: Store,
    model: str,
    step: int,
    layer: int,
    neuron: int,
    examples: int = 5,
    pieces: bool = False,
    hook: str | None = None,
) -> dict[str, Rows]:
    """A neuron's explanation, max-activating contexts, top tokens by mean activation and vocabulary extremes at
    one hook (the given one, or the only one of MODEL@STEP); empty sections when its set has not been explained
    (`actdb examples` builds it). With `pieces`, each context also comes as its raw text before and after the
    maximum's token (for JSON readers)."""
    e = v_neuron_explanations
    check_neuron(store, model, step, layer, neuron)
    hook = resolve_hook(store, hook, model, step)
    summary, contexts, top_tokens, vocabulary = [], [], [], []
    for ex, _act_path, dataset, dataset_path in _explained_sets(store, model, step, hook):
        row = store.query(select(e).where(e.c.set_id == ex.set_id, e.c.layer == layer, e.c.neuron == neuron)).first()
        if row is None:
            continue
        chance = {
            "token_r2_chance": (ex.n_token_ids - 1) / max(ex.n_tokens - 1, 1),
            "position_r2_chance": (ex.n_positions - 1) / max(ex.n_tokens - 1, 1),
        }
        summary.append({c: ({**dict(row), **chance, "dataset": dataset}).get(c) for c in EXPLANATION_COLUMNS})
        path = store.config.file(ex.path)
        if not path.exists():  # `actdb check` reports it; the SQL summary above still stands
            continue
        from actdb.store.files.explanation import read_neuron  # h5py only when there is a file to read

        expected = explanation_identity(store, ex.set_id)
        arrays = read_neuron(path, layer, neuron, expected)
        texts = set_texts(store, ex.set_id, ex.path)
        tokens = file_contents(store.config.file(dataset_path), "tokens")
        contexts += _contexts(arrays["examples"], tokens, texts, dataset, examples)
        top_tokens += _top_tokens(arrays["tokens"], texts, dataset)
        if "vocabulary" in arrays:
            vocabulary += _vocabulary(arrays["vocabulary"], texts, dataset)
    return {
        "explanation": Rows(list(EXPLANATION_COLUMNS), summary, _typed(EXPLANATION_COLUMNS)),
        "examples": Rows(
            ["dataset", "rank", "activation", "sequence", "position", "token", "context"]
            + (["before", "after"] if pieces else []),
            contexts,
            _typed(["rank", "sequence", "position"], ["activation"]),
        ),
        "top_tokens": Rows(
            ["dataset", "rank", "token_id", "token", "mean_activation", "count"],
            top_tokens,
            _typed(["rank", "token_id", "count"], ["mean_activation"]),
        ),
        "vocabulary": Rows(
            ["dataset", "rank", "top_token", "top_value", "bottom_token", "bottom_value"],
            vocabulary,
            _typed(["rank"], ["top_value", "bottom_value"]),
        ),
    }


TEXT_COLUMNS = ("dataset", "token", "context", "before", "after", "top_token", "bottom_token", "vocab_label", "family")


def _typed(integers: list[str] | tuple[str, ...], floats: list[str] | tuple[str, ...] = ()) -> dict[str, type]:
    """Column types of a section built here (so an empty section still types its columns): the text columns by
    name, the rest as given; in `EXPLANATION_COLUMNS` every non-text column is a float."""
    types: dict[str, type] = dict.fromkeys(TEXT_COLUMNS, str)
    if integers is EXPLANATION_COLUMNS:
        return types | {c: float for c in EXPLANATION_COLUMNS if c not in TEXT_COLUMNS}
    return types | dict.fromkeys(integers, int) | dict.fromkeys(floats, float)


def explanation_identity(store: Store, set_id: int) -> SidecarIdentity:
    """What the explanation file of a set must say it is (checkpoint, dataset, hook), from SQL."""
    from actdb.store.set_files import set_identity  # h5py only when there is a file to read

    with store.transaction() as conn:
        return set_identity(conn, set_id)


def set_texts(store: Store, set_id: int, path: str) -> list[str]:
    """The token texts stored with a set's explanations at `path` (relative to the store), from a file that must be
    this set's (none when the file is gone: ids then show as `<id>`)."""
    file = store.config.file(path)
    return file_contents(file, "strings", explanation_identity(store, set_id)) if file.exists() else []


def file_contents(path: Path, kind: str, expected: SidecarIdentity | None = None) -> object:
    """A token file's dataset or an explanation file's token texts (`expected`: the set's identity, which the file
    must carry), read once per version of the file: a report asks for them once per neuron page."""
    return _read_contents(path, kind, path.stat().st_mtime_ns, expected)


@functools.lru_cache(maxsize=8)
def _read_contents(path: Path, kind: str, _version: int, expected: SidecarIdentity | None) -> object:
    from actdb.store.files.explanation import read_explanation_group, unpack_strings
    from actdb.store.files.token import TokenDataset

    if kind == "tokens":
        return TokenDataset.load(path)
    return unpack_strings(read_explanation_group(path, "strings", expected))


def token_label(texts: list[str], token_id: int) -> str:
    """The stored text of a token id, or `<id>` when the explanation file has no text for it."""
    return texts[token_id] if 0 <= token_id < len(texts) else f"<{token_id}>"


def _contexts(ex: dict, tokens, texts: list[str], dataset: str, n: int) -> list[dict]:
    out = []
    seq_len = tokens.seq_len
    for rank, (value, pos) in enumerate(zip(ex["values"][:n], ex["positions"][:n], strict=True)):
        if pos < 0 or not math.isfinite(float(value)):
            break
        seq, p = divmod(int(pos), seq_len)
        ids = tokens.tokens[seq]
        # joined before they are made readable, so a character split across tokens shows whole
        before = readable("".join(token_label(texts, int(t)) for t in ids[max(0, p - BEFORE) : p]))
        after = readable("".join(token_label(texts, int(t)) for t in ids[p + 1 : p + 1 + AFTER]))
        token = readable(token_label(texts, int(ids[p])))
        out.append(
            {
                "dataset": dataset,
                "rank": rank + 1,
                "activation": float(value),
                "sequence": seq,
                "position": p,
                "token": token,
                "context": before + MARK[0] + token + MARK[1] + after,
                "before": before,
                "after": after,
            }
        )
    return out


def _top_tokens(tok: dict, texts: list[str], dataset: str) -> list[dict]:
    rows = []
    for rank, (tid, mean, count) in enumerate(zip(tok["top_ids"], tok["top_means"], tok["top_counts"], strict=True)):
        if tid < 0:
            break
        token = quoted(token_label(texts, int(tid)))
        rows.append(
            {"dataset": dataset, "rank": rank + 1, "token_id": int(tid), "token": token, "mean_activation": float(mean)}
            | {"count": int(count)}
        )
    return rows


def _vocabulary(voc: dict, texts: list[str], dataset: str) -> list[dict]:
    rows = []
    pairs = zip(voc["top_ids"], voc["top_values"], voc["bottom_ids"], voc["bottom_values"], strict=True)
    for rank, (ti, tv, bi, bv) in enumerate(pairs):
        rows.append(
            {
                "dataset": dataset,
                "rank": rank + 1,
                "top_token": quoted(token_label(texts, int(ti))),
                "top_value": float(tv),
                "bottom_token": quoted(token_label(texts, int(bi))),
                "bottom_value": float(bv),
            }
        )
    return rows


def explained_neurons(store: Store, model: str | None = None, step: int | None = None, hook: str | None = None) -> Rows:
    """Every explained neuron (`v_neuron_explanations`, its columns as they are: `top_token` is the token id),
    optionally of one model, step and hook, with the token's quoted readable text in `token` after it (as
    `families` has them)."""
    e = v_neuron_explanations
    query = select(e)
    if model is not None:
        query = query.where(e.c.model == model)
    if step is not None:
        query = query.where(e.c.step == step)
    if hook is not None:
        query = query.where(e.c.hook == hook)
    found = store.query(query.order_by(e.c.model, e.c.step, e.c.dataset, e.c.hook, e.c.layer, e.c.neuron))
    explanation = tables.set_explanation
    paths = {r["set_id"]: r["path"] for r in store.query(select(explanation.c.set_id, explanation.c.path))}
    texts: dict[int, list[str]] = {}
    rows = []
    for r in found:
        row = dict(r)
        if row["set_id"] not in texts:
            texts[row["set_id"]] = (
                set_texts(store, row["set_id"], paths[row["set_id"]]) if row["set_id"] in paths else []
            )
        token_id = row["top_token"]
        row["token"] = quoted(token_label(texts[row["set_id"]], token_id)) if token_id is not None else None
        rows.append(row)
    columns = list(found.columns)
    columns.insert(columns.index("top_token") + 1, "token")
    return Rows(columns, rows, {**found.types, "token": str})


def families(
    store: Store,
    *,
    model: str,
    step: int,
    threshold: float | None = None,
    control: str = "none",
    run: int | None = None,
    hook: str | None = None,
) -> tuple[Rows, Rows, list[str]]:
    """Universal neurons of MODEL@STEP at one hook (the given one, or the only one present; each set's widest run,
    or `run`) with their family, the family counts per layer, and the rule lines (thresholds as recorded with each
    set)."""
    check_threshold(threshold)
    hook = resolve_hook(store, hook, model, step, run=run)
    explained = _explained_sets(store, model, step, hook)
    if not explained:
        build = examples_command(f"{model}@{step}", hook=hook or HOOK_NAME)
        raise ActdbError(f"{model}@{step} has no explanations; build them with `{build}`")
    u, e = v_universality, v_neuron_explanations
    newest = newest_runs(control, run)
    joined = (
        select(
            u.c.model,
            u.c.step,
            u.c.hook,
            u.c.layer,
            u.c.neuron,
            e.c.family,
            u.c.excess_corr,
            u.c.stability,
            e.c.token_r2,
            e.c.position_r2,
            e.c.top_token,
            e.c.vocab_skew,
            e.c.vocab_kurtosis,
            (u.c.threshold if threshold is None else literal(threshold, Float)).label("threshold"),
            u.c.excess_draws,
            u.c.set_id,
        )
        .join(newest, on_newest(u, newest))
        .join(e, (e.c.set_id == u.c.set_id) & (e.c.layer == u.c.layer) & (e.c.neuron == u.c.neuron))
        .where(u.c.model == model, u.c.step == step, universal_condition(threshold))
        .where(u.c.hook == hook if hook is not None else true())
        .order_by(u.c.layer, u.c.neuron)
    )
    texts = {ex.set_id: set_texts(store, ex.set_id, ex.path) for ex, *_rest in explained}
    rows = []
    for r in store.query(joined):
        row = dict(r)
        draws = row.pop("excess_draws")
        known = texts.get(row.pop("set_id"), [])
        row["token"] = quoted(token_label(known, row["top_token"])) if row["top_token"] is not None else None
        if threshold is not None:
            row["stability"] = stability_at(draws, threshold)
        rows.append(row)
    if not rows and not store.query(select(u.c.run_id).join(newest, on_newest(u, newest)).limit(1)):
        raise ActdbError(f"no universality results for {model}@{step}; run `actdb correlate` first")
    by_layer: dict[int, dict[str, int]] = {}
    for row in rows:
        layer = by_layer.setdefault(row["layer"], dict.fromkeys(FAMILIES, 0))
        layer[row["family"]] += 1
    counts = Rows(
        ["layer", *FAMILIES, "universal"],
        [{"layer": k, **v, "universal": sum(v.values())} for k, v in sorted(by_layer.items())],
    )
    rules = sorted(
        {
            f"{dataset}: {family_rule(ex.token_min_r2, ex.position_min_r2, ex.vocab_kurtosis_min, ex.vocab_skew_min)}"
            for ex, _p, dataset, _d in explained
        }
    )
    return Rows(list(FAMILY_COLUMNS), rows), counts, rules
