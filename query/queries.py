"""Canned analyst queries over the SQL views; each returns (columns, rows) for the CLI, the API and the report.

Unless a run is named, every activation set is read from its newest complete cross-model correlation run
with the requested control, so a re-run replaces what listings show without deleting history.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from actdb.store.database import Store
from actdb.store.errors import ActdbError
from actdb.store.registry import get_model

Rows = tuple[list[str], list[tuple[Any, ...]]]

UNIVERSAL_COLUMNS = [
    "model",
    "step",
    "dataset",
    "layer",
    "neuron",
    "excess_corr",
    "mean_max_corr",
    "min_max_corr",
    "mean_baseline",
    "act_mean",
    "act_std",
    "act_skew",
    "act_kurtosis",
    "act_frac_active",
    "run_id",
]
SORTS = {
    "excess": "excess_corr DESC",
    "layer": "model, step, layer, neuron",
    "max_corr": "mean_max_corr DESC",
    "kurtosis": "act_kurtosis DESC",
}


def parse_neuron(text_: str) -> tuple[int, int]:
    layer, dot, neuron = text_.partition(".")
    if not dot or not layer.isdigit() or not neuron.isdigit():
        raise ActdbError(f"malformed neuron {text_!r}; write LAYER.NEURON, e.g. 3.1234")
    return int(layer), int(neuron)


def parse_target(text_: str) -> tuple[str, int]:
    model, sep, step = text_.rpartition("@")
    if not sep or not model or not step.isdigit():
        raise ActdbError(f"malformed checkpoint {text_!r}; write MODEL@STEP")
    return model, int(step)


def _fetch(store: Store, sql: str, params: dict[str, Any] | None = None) -> Rows:
    with store.engine.connect() as conn:
        result = conn.execute(text(sql), params or {})
        return list(result.keys()), [tuple(r) for r in result]


def latest_runs(
    store: Store, control: str = "none", model: str | None = None, step: int | None = None, run: int | None = None
) -> list[tuple[int, str, int, str]]:
    """(run_id, model, step, dataset) of each set's newest complete cross-model run with this control."""
    if model is not None:
        with store.session() as s:
            get_model(s, model)
    where = ["r.status = 'complete'", "r.kind = 'cross_model'", "r.control = :control"]
    params: dict[str, Any] = {"control": control}
    if run is not None:
        where = ["r.id = :run"]
        params = {"run": run}
    if model is not None:
        where.append("m.name = :model")
        params["model"] = model
    if step is not None:
        where.append("c.step = :step")
        params["step"] = step
    _cols, rows = _fetch(
        store,
        f"""
        SELECT MAX(r.id), m.name, c.step, d.name
        FROM run_member rm
        JOIN correlation_run r ON r.id = rm.run_id
        JOIN activation_set s ON s.id = rm.set_id
        JOIN checkpoint c ON c.id = s.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = s.dataset_id
        WHERE {" AND ".join(where)}
        GROUP BY m.name, c.step, d.name
        ORDER BY m.name, c.step""",
        params,
    )
    if not rows:
        what = (
            f"run {run}"
            if run is not None
            else "a cross-model correlation run" + (f" ({control} control)" if control != "none" else "")
        )
        scope = f" for {model}" + (f"@{step}" if step is not None else "") if model else ""
        raise ActdbError(
            f"no universality results{scope}: {what} is missing; produce it with `actdb correlate "
            f"--dataset D --step N --models A,B,...`" + (" --control token" if control == "token" else "")
        )
    return rows


def _set_filter(runs: list[tuple[int, str, int, str]], params: dict[str, Any]) -> str:
    parts = []
    for i, (run_id, model, step, dataset) in enumerate(runs):
        params.update({f"r{i}": run_id, f"m{i}": model, f"s{i}": step, f"d{i}": dataset})
        parts.append(f"(run_id = :r{i} AND model = :m{i} AND step = :s{i} AND dataset = :d{i})")
    return "(" + " OR ".join(parts) + ")"


def universal_neurons(
    store: Store,
    model: str | None = None,
    step: int | None = None,
    layer: int | None = None,
    run: int | None = None,
    threshold: float | None = None,
    control: str = "none",
    sort: str = "excess",
    limit: int | None = None,
) -> Rows:
    """Universal neurons with their scores and activation statistics."""
    runs = latest_runs(store, control, model, step, run)
    params: dict[str, Any] = {}
    where = [_set_filter(runs, params)]
    if threshold is None:
        where.append("is_universal = TRUE")
    else:
        where.append("excess_corr > :threshold")
        params["threshold"] = threshold
    if layer is not None:
        where.append("layer = :layer")
        params["layer"] = layer
    sql = (
        f"SELECT {', '.join(UNIVERSAL_COLUMNS)} FROM v_universality WHERE {' AND '.join(where)} ORDER BY {SORTS[sort]}"
    )
    if limit:
        sql += f" LIMIT {int(limit)}"
    return _fetch(store, sql, params)


def universal_by_layer(
    store: Store,
    model: str | None = None,
    step: int | None = None,
    run: int | None = None,
    threshold: float | None = None,
    control: str = "none",
) -> Rows:
    """Per layer counts and percentages of universal neurons."""
    runs = latest_runs(store, control, model, step, run)
    params: dict[str, Any] = {}
    flag = "is_universal = TRUE" if threshold is None else "excess_corr > :threshold"
    if threshold is not None:
        params["threshold"] = threshold
    return _fetch(
        store,
        f"""
        SELECT model, step, dataset, layer, COUNT(*) AS n_neurons,
               SUM(CASE WHEN {flag} THEN 1 ELSE 0 END) AS n_universal,
               SUM(CASE WHEN is_dead = TRUE THEN 1 ELSE 0 END) AS n_dead,
               CAST(100.0 * SUM(CASE WHEN {flag} THEN 1 ELSE 0 END) AS DOUBLE PRECISION) / COUNT(*) AS pct_universal,
               AVG(mean_max_corr) AS mean_max_corr, AVG(mean_baseline) AS mean_baseline, run_id
        FROM v_universality WHERE {_set_filter(runs, params)}
        GROUP BY model, step, dataset, layer, run_id ORDER BY model, step, layer""",
        params,
    )


def max_corr_by_step(store: Store, control: str = "none") -> Rows:
    """(step, mean_max_corr, mean_baseline) of every live neuron in each set's newest cross-model run."""
    runs = latest_runs(store, control)
    params: dict[str, Any] = {}
    return _fetch(
        store,
        "SELECT step, mean_max_corr, mean_baseline FROM v_universality "
        f"WHERE is_dead = FALSE AND {_set_filter(runs, params)}",
        params,
    )


def neuron_story(store: Store, model: str, step: int, layer: int, neuron: int) -> dict[str, Rows]:
    """Everything known about one neuron: statistics, matches, universality, history, ablations."""
    p = {"model": model, "step": step, "layer": layer, "neuron": neuron}
    known = _fetch(
        store,
        """
        SELECT m.n_layers, m.d_mlp FROM model m JOIN checkpoint c ON c.model_id = m.id
        WHERE m.name = :model AND c.step = :step""",
        p,
    )[1]
    if not known:
        raise ActdbError(f"unknown checkpoint {model}@{step}; see `actdb status`")
    n_layers, d_mlp = known[0]
    if not (0 <= layer < n_layers and 0 <= neuron < d_mlp):
        raise ActdbError(f"neuron {layer}.{neuron} does not exist ({model} has {n_layers} layers x {d_mlp} neurons)")
    story = {
        "statistics": _fetch(
            store,
            """
            SELECT d.name AS dataset, st.count, st.mean, st.std, st.skew, st.kurtosis, st.frac_active, st.min, st.max
            FROM neuron_stat st JOIN activation_set s ON s.id = st.set_id
            JOIN checkpoint c ON c.id = s.checkpoint_id JOIN model m ON m.id = c.model_id
            JOIN dataset d ON d.id = s.dataset_id
            WHERE m.name = :model AND c.step = :step AND st.layer = :layer AND st.neuron = :neuron""",
            p,
        ),
        "matches": _fetch(
            store,
            """
            SELECT run_id, control, other_model, other_step, max_corr, best_layer, best_neuron, baseline_max_corr,
                   self_corr
            FROM v_neuron_matches WHERE model = :model AND step = :step AND layer = :layer AND neuron = :neuron
            ORDER BY run_id DESC, other_model, other_step""",
            p,
        ),
        "universality": _fetch(
            store,
            """
            SELECT run_id, control, threshold, excess_corr, mean_max_corr, min_max_corr, mean_baseline,
                   is_universal, is_dead
            FROM v_universality WHERE model = :model AND step = :step AND layer = :layer AND neuron = :neuron
            ORDER BY run_id DESC""",
            p,
        ),
        "history": _fetch(
            store,
            """
            SELECT step, control, run_id, excess_corr, mean_max_corr, is_universal, emergence_step
            FROM v_neuron_history WHERE model = :model AND layer = :layer AND neuron = :neuron
            ORDER BY control, step, run_id""",
            p,
        ),
        "self_correlation": _fetch(
            store,
            """
            SELECT step AS from_step, other_step AS to_step, control, self_corr, max_corr, best_layer, best_neuron
            FROM v_neuron_matches WHERE model = :model AND other_model = :model AND other_step > step
                 AND layer = :layer AND neuron = :neuron ORDER BY control, step, other_step""",
            p,
        ),
    }
    abl_p = dict(p, pattern=f'%"{layer}.{neuron}"%')
    story["ablations"] = _fetch(
        store,
        """
        SELECT v.ablation_id, v.method, v.selector, v.n_neurons, v.tokens, v.delta, v.control_mean, v.p_value,
               an.delta AS own_delta
        FROM v_ablation_summary v
        JOIN ablation a ON a.id = v.ablation_id
        LEFT JOIN ablation_neuron an ON an.ablation_id = a.id AND an.layer = :layer AND an.neuron = :neuron
        WHERE v.model = :model AND v.step = :step AND a.neurons LIKE :pattern
        ORDER BY v.ablation_id""",
        abl_p,
    )
    return story


def runs_listing(store: Store) -> Rows:
    return _fetch(
        store,
        """
        SELECT r.id AS run_id, r.kind, r.status, d.name AS dataset, r.control, r.threshold, r.baseline_seed,
               COUNT(rm.set_id) AS n_sets, r.n_tokens, r.n_passes, r.n_dead, r.backend, r.seconds, r.started_at,
               r.error
        FROM correlation_run r JOIN dataset d ON d.id = r.dataset_id
        LEFT JOIN run_member rm ON rm.run_id = r.id
        GROUP BY r.id, r.kind, r.status, d.name, r.control, r.threshold, r.baseline_seed, r.n_tokens, r.n_passes,
                 r.n_dead, r.backend, r.seconds, r.started_at, r.error
        ORDER BY r.id""",
    )


def ablations_listing(store: Store, model: str | None = None) -> Rows:
    where, params = "", {}
    if model:
        where, params = "WHERE model = :model", {"model": model}
    return _fetch(
        store,
        f"""
        SELECT ablation_id, model, step, dataset, method, selector, n_neurons, tokens, base_loss, ablated_loss,
               delta, n_controls, control_mean, control_std, control_ci_low, control_ci_high, p_value
        FROM v_ablation_summary {where} ORDER BY ablation_id""",
        params,
    )


def similarity_matrix(store: Store, control: str = "none") -> Rows:
    """Mean max-corr between every pair of activation sets correlated together (seeds x steps)."""
    return _fetch(
        store,
        """
        SELECT model || '@' || CAST(step AS VARCHAR(20)) AS source,
               other_model || '@' || CAST(other_step AS VARCHAR(20)) AS target,
               AVG(max_corr) AS mean_max_corr, MAX(run_id) AS run_id
        FROM v_neuron_matches WHERE control = :control
        GROUP BY model, step, other_model, other_step ORDER BY source, target""",
        {"control": control},
    )
