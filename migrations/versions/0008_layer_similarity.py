"""Layer-pair similarity of whole activation sets (`actdb similarity`): `layer_similarity` rows per run, set
pair and layer pair, and the view `v_similarity` with model names and steps.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

V_SIMILARITY = """
    SELECT ls.run_id, r.control, r.baseline_draws AS n_draws, m.name AS model, c.step, d.name AS dataset,
           ls.layer, om.name AS other_model, oc.step AS other_step, ls.other_layer, ls.mean_max_corr,
           ls.mean_baseline, ls.baseline_sd, ls.mean_max_corr - ls.mean_baseline AS excess_corr, ls.matched_corr,
           ls.cka, ls.set_id, ls.other_set_id
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
"""


def upgrade() -> None:
    op.create_table(
        "layer_similarity",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("other_set_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("other_layer", sa.Integer(), nullable=False),
        sa.Column("mean_max_corr", sa.Float(), nullable=True),
        sa.Column("mean_baseline", sa.Float(), nullable=True),
        sa.Column("baseline_sd", sa.Float(), nullable=True),
        sa.Column("matched_corr", sa.Float(), nullable=True),
        sa.Column("cka", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["correlation_run.id"],
            name=op.f("fk_layer_similarity_run_id_correlation_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["set_id"],
            ["activation_set.id"],
            name=op.f("fk_layer_similarity_set_id_activation_set"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["other_set_id"],
            ["activation_set.id"],
            name=op.f("fk_layer_similarity_other_set_id_activation_set"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "set_id", "other_set_id", "layer", "other_layer", name=op.f("pk_layer_similarity")
        ),
    )
    op.execute(f"CREATE VIEW v_similarity AS {V_SIMILARITY}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_similarity")
    op.drop_table("layer_similarity")
