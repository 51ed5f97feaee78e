"""Reads know the hook, and views that give one answer.

- Every view over activation sets gains `hook` (`mlp.post` / `mlp.pre`) after `dataset`; views that pair two sets
  gain `other_hook`; `v_universal_by_layer` also gains `set_id` (a layer's row is one set's). Old columns stay.
- `v_canonical_runs`: for each activation set and control, the run the CLI reads (`store.database.labels.
  newest_runs`): the complete cross-model run that compared the set with the most sets, the newest among equals.
- `v_canonical_universality`, `v_canonical_universal_neurons`, `v_canonical_universal_by_layer`: the per-run
  views restricted to those runs, so one neuron has one row per set and control however many runs exist.

Revision ID: 0011
Revises: 0010
"""

import importlib

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
V0007 = importlib.import_module("actdb.migrations.versions.0007_baseline_draws_exclusions_control_spread")
V0008 = importlib.import_module("actdb.migrations.versions.0008_layer_similarity")
V0010 = importlib.import_module("actdb.migrations.versions.0010_neuron_explanations")
SET_LABELS = BASE.SET_LABELS
IS_UNIVERSAL = BASE.IS_UNIVERSAL

# What this revision replaces, in an order that creates a view after the views it reads (dropped in reverse).
OLD_VIEWS = {
    "v_universality": V0007.VIEWS["v_universality"],
    "v_universal_neurons": V0007.VIEWS["v_universal_neurons"],
    "v_universal_by_layer": V0007.VIEWS["v_universal_by_layer"],
    "v_neuron_matches": V0007.VIEWS["v_neuron_matches"],
    "v_neuron_history": V0007.VIEWS["v_neuron_history"],
    "v_similarity": V0008.V_SIMILARITY,
    "v_neuron_explanations": V0010.VIEWS["v_neuron_explanations"],
    "v_neuron_families": V0010.VIEWS["v_neuron_families"],
}

VIEWS = {
    "v_universality": f"""
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, s.hook, u.layer,
               u.neuron, u.excess_corr, u.stability, u.z, u.mean_max_corr, u.min_max_corr, u.mean_baseline,
               u.baseline_sd, r.baseline_draws AS n_draws, {IS_UNIVERSAL} AS is_universal, u.is_dead,
               st.mean AS act_mean, st.std AS act_std, st.skew AS act_skew, st.kurtosis AS act_kurtosis,
               st.frac_active AS act_frac_active, u.set_id, u.excess_draws
        FROM universality u
        JOIN correlation_run r ON r.id = u.run_id
        JOIN {SET_LABELS.format(key="u.set_id")}
        LEFT JOIN neuron_stat st ON st.set_id = u.set_id AND st.layer = u.layer AND st.neuron = u.neuron
        WHERE r.status = 'complete'
    """,
    "v_universal_neurons": """
        SELECT * FROM v_universality WHERE is_universal = TRUE
    """,
    "v_universal_by_layer": f"""
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, s.hook, u.layer,
               COUNT(*) AS n_neurons,
               SUM(CASE WHEN u.excess_corr > r.threshold THEN 1 ELSE 0 END) AS n_universal,
               SUM(CASE WHEN u.is_dead = TRUE THEN 1 ELSE 0 END) AS n_dead,
               CAST(100.0 * SUM(CASE WHEN u.excess_corr > r.threshold THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
                   / COUNT(*) AS pct_universal,
               AVG(u.mean_max_corr) AS mean_max_corr, AVG(u.mean_baseline) AS mean_baseline,
               AVG(u.excess_corr) AS mean_excess_corr, u.set_id
        FROM universality u
        JOIN correlation_run r ON r.id = u.run_id
        JOIN {SET_LABELS.format(key="u.set_id")}
        WHERE r.status = 'complete'
        GROUP BY u.run_id, r.control, r.threshold, m.name, c.step, d.name, s.hook, u.layer, u.set_id
    """,
    "v_neuron_matches": f"""
        SELECT nm.run_id, r.control, m.name AS model, c.step, d.name AS dataset, s.hook, nm.layer, nm.neuron,
               om.name AS other_model, oc.step AS other_step, os.hook AS other_hook, nm.max_corr, nm.best_layer,
               nm.best_neuron, nm.baseline_max_corr, nm.baseline_sd, nm.self_corr
        FROM neuron_match nm
        JOIN correlation_run r ON r.id = nm.run_id
        JOIN {SET_LABELS.format(key="nm.set_id")}
        JOIN activation_set os ON os.id = nm.other_set_id
        JOIN checkpoint oc ON oc.id = os.checkpoint_id
        JOIN model om ON om.id = oc.model_id
        WHERE r.status = 'complete'
    """,
    "v_neuron_history": """
        SELECT v.model, v.dataset, v.hook, v.control, v.threshold, v.step, v.layer, v.neuron, v.run_id,
               v.excess_corr, v.stability, v.mean_max_corr, v.mean_baseline, v.is_universal, v.is_dead,
               e.emergence_step
        FROM v_universality v
        JOIN model m ON m.name = v.model
        JOIN dataset d ON d.name = v.dataset
        LEFT JOIN neuron_emergence e ON e.model_id = m.id AND e.dataset_id = d.id AND e.control = v.control
             AND e.threshold = v.threshold AND e.layer = v.layer AND e.neuron = v.neuron
    """,
    "v_similarity": """
        SELECT ls.run_id, r.control, r.baseline_draws AS n_draws, m.name AS model, c.step, d.name AS dataset,
               s.hook, ls.layer, om.name AS other_model, oc.step AS other_step, os.hook AS other_hook,
               ls.other_layer, ls.mean_max_corr, ls.mean_baseline, ls.baseline_sd,
               ls.mean_max_corr - ls.mean_baseline AS excess_corr, ls.matched_corr, ls.cka, ls.set_id,
               ls.other_set_id
        FROM layer_similarity ls
        JOIN correlation_run r ON r.id = ls.run_id
        JOIN activation_set s ON s.id = ls.set_id
        JOIN checkpoint c ON c.id = s.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = s.dataset_id
        JOIN activation_set os ON os.id = ls.other_set_id
        JOIN checkpoint oc ON oc.id = os.checkpoint_id
        JOIN model om ON om.id = oc.model_id
        WHERE r.status = 'complete'
    """,
    "v_neuron_explanations": f"""
        SELECT m.name AS model, c.step, d.name AS dataset, s.hook, e.layer, e.neuron, e.max_activation, e.token_r2,
               e.position_r2, e.top_token, e.top_token_mean, e.top_token_count, e.vocab_mean, e.vocab_var,
               e.vocab_skew, e.vocab_kurtosis, e.vocab_label, {V0010.FAMILY} AS family, x.token_min_r2,
               x.position_min_r2, x.vocab_kurtosis_min, x.vocab_skew_min, e.set_id
        FROM neuron_explanation e
        JOIN set_explanation x ON x.set_id = e.set_id
        JOIN {SET_LABELS.format(key="e.set_id")}
    """,
    "v_neuron_families": """
        SELECT u.run_id, u.control, u.threshold, u.model, u.step, u.dataset, u.hook, u.layer, u.neuron,
               u.excess_corr, u.stability, e.token_r2, e.position_r2, e.top_token, e.vocab_skew, e.vocab_kurtosis,
               e.vocab_label, e.family, u.set_id
        FROM v_universal_neurons u
        JOIN v_neuron_explanations e ON e.set_id = u.set_id AND e.layer = u.layer AND e.neuron = u.neuron
    """,
    # The CLI's rule (labels.newest_runs), for every set and control at once.
    "v_canonical_runs": """
        SELECT ranked.set_id, ranked.control, ranked.run_id, ranked.n_members
        FROM (
            SELECT rm.set_id, r.control, rm.run_id, w.n_members,
                   ROW_NUMBER() OVER (PARTITION BY rm.set_id, r.control
                                      ORDER BY w.n_members DESC, rm.run_id DESC) AS pick
            FROM run_member rm
            JOIN correlation_run r ON r.id = rm.run_id
            JOIN (SELECT run_id, COUNT(*) AS n_members FROM run_member GROUP BY run_id) w ON w.run_id = rm.run_id
            WHERE r.status = 'complete' AND r.kind = 'cross_model'
        ) ranked
        WHERE ranked.pick = 1
    """,
    "v_canonical_universality": """
        SELECT v.* FROM v_universality v
        JOIN v_canonical_runs k ON k.run_id = v.run_id AND k.set_id = v.set_id
    """,
    "v_canonical_universal_neurons": """
        SELECT * FROM v_canonical_universality WHERE is_universal = TRUE
    """,
    "v_canonical_universal_by_layer": """
        SELECT b.* FROM v_universal_by_layer b
        JOIN v_canonical_runs k ON k.run_id = b.run_id AND k.set_id = b.set_id
    """,
}


def upgrade() -> None:
    BASE._drop_views(OLD_VIEWS)
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    BASE._create_views(OLD_VIEWS)
