"""What the numbers rest on: the ablation's evaluation split, per-neuron baseline draws, and persistence's
self-correlation over the universal neurons.

- `ablation.eval_split` (`held_out`: sequences that did not select the neurons; `in_sample`: the selecting
  sequences, the old behaviour; `listed`: neurons given by the user, chosen on no stored data),
  `ablation.eval_sequences` (the measured sequences of `dataset_id`, as ranges), `ablation.n_eval_sequences`,
  `ablation.selection_dataset_id` (the dataset whose correlation run chose the neurons) and
  `ablation.positions` (`counted`: activations replaced only at counted positions; `all`: at every position).
  Rows recorded before were measured in sample at every position.
- `universality.n_draws`: how many baseline draws each neuron's scores rest on (adaptive runs draw more for
  the neurons whose label is uncertain); `universality.z_pooled`: excess over a pooled (shrunk) baseline sd.
- `persistence.mean_self_corr_universal`: the mean self-correlation over the neurons universal at the
  earlier step (`mean_self_corr` stays the mean over every neuron of the layer).
- Views show them: `v_ablation_summary`, `v_persistence`, and `v_universality` (with `n_draws` per neuron)
  and the views built on it (0011's bodies, with the hook).

Revision ID: 0014
Revises: 0013
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
DRAWS = importlib.import_module("actdb.migrations.versions.0007_baseline_draws_exclusions_control_spread")
HOOKS = importlib.import_module("actdb.migrations.versions.0011_hook_in_views_and_canonical_views")
SET_LABELS = BASE.SET_LABELS
IS_UNIVERSAL = BASE.IS_UNIVERSAL

# every view that reads v_universality (directly, through v_universal_neurons or the canonical views) is rebuilt
# with it, in an order that creates a view after those it reads; the bodies are 0011's (with the hook)
OLD_VIEWS = {
    "v_universality": HOOKS.VIEWS["v_universality"],
    "v_universal_neurons": HOOKS.VIEWS["v_universal_neurons"],
    "v_neuron_history": HOOKS.VIEWS["v_neuron_history"],
    "v_neuron_families": HOOKS.VIEWS["v_neuron_families"],
    "v_canonical_universality": HOOKS.VIEWS["v_canonical_universality"],
    "v_canonical_universal_neurons": HOOKS.VIEWS["v_canonical_universal_neurons"],
    "v_persistence": DRAWS.VIEWS["v_persistence"],
    "v_ablation_summary": DRAWS.VIEWS["v_ablation_summary"],
}

VIEWS = dict(OLD_VIEWS)
VIEWS["v_universality"] = f"""
        SELECT u.run_id, r.control, r.threshold, m.name AS model, c.step, d.name AS dataset, s.hook, u.layer,
               u.neuron, u.excess_corr, u.stability, u.z, u.z_pooled, u.mean_max_corr, u.min_max_corr,
               u.mean_baseline, u.baseline_sd, COALESCE(u.n_draws, r.baseline_draws) AS n_draws,
               {IS_UNIVERSAL} AS is_universal, u.is_dead, st.mean AS act_mean, st.std AS act_std,
               st.skew AS act_skew, st.kurtosis AS act_kurtosis, st.frac_active AS act_frac_active, u.set_id,
               u.excess_draws
        FROM universality u
        JOIN correlation_run r ON r.id = u.run_id
        JOIN {SET_LABELS.format(key="u.set_id")}
        LEFT JOIN neuron_stat st ON st.set_id = u.set_id AND st.layer = u.layer AND st.neuron = u.neuron
        WHERE r.status = 'complete'
    """
VIEWS["v_persistence"] = """
        SELECT m.name AS model, d.name AS dataset, p.control, p.threshold, p.from_step, p.to_step, p.layer,
               p.n_universal_from, p.n_universal_to, p.n_kept, p.p_persist, p.jaccard, p.mean_self_corr,
               p.mean_self_corr_universal, p.from_run_id, p.to_run_id, p.self_run_id
        FROM persistence p
        JOIN model m ON m.id = p.model_id
        JOIN dataset d ON d.id = p.dataset_id
    """
VIEWS["v_ablation_summary"] = """
        SELECT a.id AS ablation_id, m.name AS model, c.step, d.name AS dataset, a.method, a.selector, a.threshold,
               a.n_neurons, a.tokens, a.eval_split, a.eval_sequences, a.n_eval_sequences, a.positions,
               sd.name AS selection_dataset, a.base_loss, a.ablated_loss, a.delta, a.n_controls, a.control_mean,
               a.control_std, a.control_min, a.control_max, a.control_ci_low, a.control_ci_high, a.p_value,
               1.0 / (a.n_controls + 1) AS p_floor, a.delta - a.control_mean AS delta_vs_controls, a.run_id,
               a.created_at
        FROM ablation a
        JOIN checkpoint c ON c.id = a.checkpoint_id
        JOIN model m ON m.id = c.model_id
        JOIN dataset d ON d.id = a.dataset_id
        LEFT JOIN dataset sd ON sd.id = a.selection_dataset_id
        WHERE a.status = 'complete'
    """


def upgrade() -> None:
    BASE._drop_views(OLD_VIEWS)
    with op.batch_alter_table("ablation") as b:
        b.add_column(sa.Column("eval_split", sa.String(length=20), nullable=False, server_default="in_sample"))
        b.add_column(sa.Column("eval_sequences", sa.Text(), nullable=True))
        b.add_column(sa.Column("n_eval_sequences", sa.Integer(), nullable=True))
        b.add_column(sa.Column("positions", sa.String(length=20), nullable=False, server_default="all"))
        b.add_column(sa.Column("selection_dataset_id", sa.Integer(), nullable=True))
        b.create_foreign_key(
            "fk_ablation_selection_dataset", "dataset", ["selection_dataset_id"], ["id"], ondelete="SET NULL"
        )
    with op.batch_alter_table("ablation") as b:
        b.alter_column("eval_split", server_default=None)
        b.alter_column("positions", server_default=None)
    op.add_column("universality", sa.Column("n_draws", sa.Integer(), nullable=True))
    op.add_column("universality", sa.Column("z_pooled", sa.Float(), nullable=True))
    op.add_column("persistence", sa.Column("mean_self_corr_universal", sa.Float(), nullable=True))
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    op.execute("ALTER TABLE persistence DROP COLUMN mean_self_corr_universal")
    op.execute("ALTER TABLE universality DROP COLUMN z_pooled")
    op.execute("ALTER TABLE universality DROP COLUMN n_draws")
    with op.batch_alter_table("ablation") as b:
        b.drop_constraint("fk_ablation_selection_dataset", type_="foreignkey")
        for name in ("selection_dataset_id", "positions", "n_eval_sequences", "eval_sequences", "eval_split"):
            b.drop_column(name)
    BASE._create_views(OLD_VIEWS)
