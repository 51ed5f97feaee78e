"""Labels that survive a second look.

- `correlation_run.baseline_draws`: K rotations per model; `neuron_match.baseline_sd`; `universality` gains
  `baseline_sd`, `z`, `stability` (share of draws universal at the run's threshold) and `excess_draws`.
  Runs recorded before hold one draw.
- `dataset.excluded_tokens` (token ids masked like BOS/EOS/padding) and `dataset.fingerprint` (token ids plus
  exclusions; equal to `token_sha256` when nothing is excluded).
- `ablation.control_min`, `control_max`, `control_deltas`.
- Views show the new columns, and `v_ablation_summary.p_floor`, the smallest p-value its controls can reach.

Revision ID: 0007
Revises: 0006
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PREVIOUS = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
SET_LABELS = PREVIOUS.SET_LABELS
IS_UNIVERSAL = PREVIOUS.IS_UNIVERSAL

VIEWS = dict(PREVIOUS.VIEWS)
VIEWS["v_universality"] = f"""
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, u.layer, u.neuron,
               u.excess_corr, u.stability, u.z, u.mean_max_corr, u.min_max_corr, u.mean_baseline, u.baseline_sd,
               r.baseline_draws AS n_draws, {IS_UNIVERSAL} AS is_universal, u.is_dead,
               st.mean AS act_mean, st.std AS act_std, st.skew AS act_skew, st.kurtosis AS act_kurtosis,
               st.frac_active AS act_frac_active, u.set_id, u.excess_draws
        FROM universality u
        JOIN correlation_run r ON r.id = u.run_id
        JOIN {SET_LABELS.format(key="u.set_id")}
        LEFT JOIN neuron_stat st ON st.set_id = u.set_id AND st.layer = u.layer AND st.neuron = u.neuron
        WHERE r.status = 'complete'
    """
VIEWS["v_neuron_matches"] = f"""
        SELECT nm.run_id, r.control, m.name AS model, c.step, d.name AS dataset, nm.layer, nm.neuron,
               om.name AS other_model, oc.step AS other_step, nm.max_corr, nm.best_layer, nm.best_neuron,
               nm.baseline_max_corr, nm.baseline_sd, nm.self_corr
        FROM neuron_match nm
        JOIN correlation_run r ON r.id = nm.run_id
        JOIN {SET_LABELS.format(key="nm.set_id")}
        JOIN activation_set os ON os.id = nm.other_set_id
        JOIN checkpoint oc ON oc.id = os.checkpoint_id
        JOIN model om ON om.id = oc.model_id
        WHERE r.status = 'complete'
    """
VIEWS["v_ablation_summary"] = """
        SELECT a.id AS ablation_id, m.name AS model, c.step, d.name AS dataset, a.method, a.selector, a.threshold,
               a.n_neurons, a.tokens, a.base_loss, a.ablated_loss, a.delta, a.n_controls, a.control_mean,
               a.control_std, a.control_min, a.control_max, a.control_ci_low, a.control_ci_high, a.p_value,
               1.0 / (a.n_controls + 1) AS p_floor, a.delta - a.control_mean AS delta_vs_controls, a.run_id,
               a.created_at
        FROM ablation a
        JOIN checkpoint c ON c.id = a.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = a.dataset_id
        WHERE a.status = 'complete'
    """
VIEWS["v_neuron_history"] = """
        SELECT v.model, v.dataset, v.control, v.threshold, v.step, v.layer, v.neuron, v.run_id, v.excess_corr,
               v.stability, v.mean_max_corr, v.mean_baseline, v.is_universal, v.is_dead, e.emergence_step
        FROM v_universality v
        JOIN model m ON m.name = v.model
        JOIN dataset d ON d.name = v.dataset
        LEFT JOIN neuron_emergence e ON e.model_id = m.id AND e.dataset_id = d.id AND e.control = v.control
             AND e.threshold = v.threshold AND e.layer = v.layer AND e.neuron = v.neuron
    """


def upgrade() -> None:
    PREVIOUS._drop_views(PREVIOUS.VIEWS)
    with op.batch_alter_table("correlation_run") as b:
        b.add_column(sa.Column("baseline_draws", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("correlation_run") as b:
        b.alter_column("baseline_draws", server_default=None)
    op.add_column("neuron_match", sa.Column("baseline_sd", sa.Float(), nullable=True))
    for name, kind in (
        ("baseline_sd", sa.Float()),
        ("z", sa.Float()),
        ("stability", sa.Float()),
        ("excess_draws", sa.Text()),
    ):
        op.add_column("universality", sa.Column(name, kind, nullable=True))
    # one draw: the label either holds (1) or not (0); the single excess is its own draw
    op.execute(
        "UPDATE universality SET excess_draws = CAST(excess_corr AS VARCHAR(40)), stability = CASE WHEN "
        "excess_corr IS NULL THEN NULL WHEN excess_corr > (SELECT r.threshold FROM correlation_run r "
        "WHERE r.id = universality.run_id) THEN 1.0 ELSE 0.0 END"
    )
    with op.batch_alter_table("dataset") as b:
        b.add_column(sa.Column("excluded_tokens", sa.Text(), nullable=False, server_default="[]"))
        b.add_column(sa.Column("fingerprint", sa.String(length=64), nullable=False, server_default=""))
    op.execute("UPDATE dataset SET fingerprint = token_sha256")
    with op.batch_alter_table("dataset") as b:
        b.alter_column("excluded_tokens", server_default=None)
        b.alter_column("fingerprint", server_default=None)
    for name, kind in (("control_min", sa.Float()), ("control_max", sa.Float()), ("control_deltas", sa.Text())):
        op.add_column("ablation", sa.Column(name, kind, nullable=True))
    PREVIOUS._create_views(VIEWS)


def downgrade() -> None:
    PREVIOUS._drop_views(VIEWS)
    for table, names in (
        ("ablation", ("control_deltas", "control_max", "control_min")),
        ("dataset", ("fingerprint", "excluded_tokens")),
        ("universality", ("excess_draws", "stability", "z", "baseline_sd")),
        ("neuron_match", ("baseline_sd",)),
        ("correlation_run", ("baseline_draws",)),
    ):
        for name in names:
            op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
    PREVIOUS._create_views(PREVIOUS.VIEWS)
