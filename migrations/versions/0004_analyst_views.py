"""Analyst views: v_universal_neurons, v_universal_by_layer, v_neuron_matches, v_persistence,
v_ablation_summary, v_neuron_history.

Plain SQL that reads the same on SQLite and PostgreSQL, with model names and steps instead of ids.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SET_LABELS = """activation_set s ON s.id = {key}
        JOIN checkpoint c ON c.id = s.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = s.dataset_id"""

VIEWS = {
    "v_universality": f"""
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, u.layer, u.neuron,
               u.excess_corr, u.mean_max_corr, u.min_max_corr, u.mean_baseline, u.is_universal, u.is_dead,
               st.mean AS act_mean, st.std AS act_std, st.skew AS act_skew, st.kurtosis AS act_kurtosis,
               st.frac_active AS act_frac_active
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
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, u.layer,
               COUNT(*) AS n_neurons,
               SUM(CASE WHEN u.is_universal = TRUE THEN 1 ELSE 0 END) AS n_universal,
               SUM(CASE WHEN u.is_dead = TRUE THEN 1 ELSE 0 END) AS n_dead,
               CAST(100.0 * SUM(CASE WHEN u.is_universal = TRUE THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
                   / COUNT(*) AS pct_universal,
               AVG(u.mean_max_corr) AS mean_max_corr, AVG(u.mean_baseline) AS mean_baseline,
               AVG(u.excess_corr) AS mean_excess_corr
        FROM universality u
        JOIN correlation_run r ON r.id = u.run_id
        JOIN {SET_LABELS.format(key="u.set_id")}
        WHERE r.status = 'complete'
        GROUP BY u.run_id, r.control, r.threshold, m.name, c.step, d.name, u.layer
    """,
    "v_neuron_matches": f"""
        SELECT nm.run_id, r.control, m.name AS model, c.step, d.name AS dataset, nm.layer, nm.neuron,
               om.name AS other_model, oc.step AS other_step, nm.max_corr, nm.best_layer, nm.best_neuron,
               nm.baseline_max_corr, nm.self_corr
        FROM neuron_match nm
        JOIN correlation_run r ON r.id = nm.run_id
        JOIN {SET_LABELS.format(key="nm.set_id")}
        JOIN activation_set os ON os.id = nm.other_set_id
        JOIN checkpoint oc ON oc.id = os.checkpoint_id
        JOIN model om ON om.id = oc.model_id
        WHERE r.status = 'complete'
    """,
    "v_persistence": """
        SELECT m.name AS model, d.name AS dataset, p.control, p.from_step, p.to_step, p.layer,
               p.n_universal_from, p.n_universal_to, p.n_kept, p.p_persist, p.jaccard, p.mean_self_corr,
               p.from_run_id, p.to_run_id, p.self_run_id
        FROM persistence p
        JOIN model m ON m.id = p.model_id
        JOIN dataset d ON d.id = p.dataset_id
    """,
    "v_ablation_summary": """
        SELECT a.id AS ablation_id, m.name AS model, c.step, d.name AS dataset, a.method, a.selector, a.n_neurons,
               a.tokens, a.base_loss, a.ablated_loss, a.delta, a.n_controls, a.control_mean, a.control_std,
               a.control_ci_low, a.control_ci_high, a.p_value, a.delta - a.control_mean AS delta_vs_controls,
               a.run_id, a.created_at
        FROM ablation a
        JOIN checkpoint c ON c.id = a.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = a.dataset_id
    """,
    "v_neuron_history": """
        SELECT v.model, v.dataset, v.control, v.step, v.layer, v.neuron, v.run_id, v.excess_corr, v.mean_max_corr,
               v.mean_baseline, v.is_universal, v.is_dead, e.emergence_step
        FROM v_universality v
        JOIN model m ON m.name = v.model
        JOIN dataset d ON d.name = v.dataset
        LEFT JOIN neuron_emergence e ON e.model_id = m.id AND e.dataset_id = d.id AND e.control = v.control
             AND e.layer = v.layer AND e.neuron = v.neuron
    """,
}


def upgrade() -> None:
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
