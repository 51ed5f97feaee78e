"""The hook in ablation: `ablation.hook` is the hook of the set whose labels chose the neurons (`actdb ablate
--hook`, asked for like every read when a checkpoint has sets at both), and `v_ablation_summary` shows it.

- Rows recorded before were all chosen from `mlp.post` sets (the only hook ablation read), hence the backfill.
- The view's body is 0014's with `a.hook` after the dataset.
- The hook joins the request key, so a request made before this revision measures once more when repeated.

Revision ID: 0022
Revises: 0021
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

BASE = importlib.import_module("actdb.migrations.versions.0005_one_universal_rule_and_run_lifecycle")
TRUTH = importlib.import_module("actdb.migrations.versions.0014_truth_ablation_split_draws_self_corr")

OLD_VIEWS = {"v_ablation_summary": TRUTH.VIEWS["v_ablation_summary"]}

VIEWS = {
    "v_ablation_summary": """
        SELECT a.id AS ablation_id, m.name AS model, c.step, d.name AS dataset, a.hook, a.method, a.selector,
               a.threshold, a.n_neurons, a.tokens, a.eval_split, a.eval_sequences, a.n_eval_sequences, a.positions,
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
    """,
}


def upgrade() -> None:
    BASE._drop_views(OLD_VIEWS)
    with op.batch_alter_table("ablation") as b:
        b.add_column(sa.Column("hook", sa.String(length=50), nullable=False, server_default="mlp.post"))
    with op.batch_alter_table("ablation") as b:
        b.alter_column("hook", server_default=None)
    BASE._create_views(VIEWS)


def downgrade() -> None:
    BASE._drop_views(VIEWS)
    with op.batch_alter_table("ablation") as b:
        b.drop_column("hook")
    BASE._create_views(OLD_VIEWS)
