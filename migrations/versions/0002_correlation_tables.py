"""Correlation tables: correlation_run, run_member, neuron_match, universality.

Results of blocked cross-model correlation with the rotation baseline.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "correlation_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("control", sa.String(length=20), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("baseline_seed", sa.Integer(), nullable=False),
        sa.Column("topk", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("n_tokens", sa.BigInteger(), nullable=True),
        sa.Column("n_passes", sa.Integer(), nullable=True),
        sa.Column("n_dead", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["dataset.id"],
            name=op.f("fk_correlation_run_dataset_id_dataset"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_correlation_run")),
    )
    with op.batch_alter_table("correlation_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_correlation_run_request_key"), ["request_key"], unique=False)
    op.create_table(
        "run_member",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["correlation_run.id"],
            name=op.f("fk_run_member_run_id_correlation_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["set_id"],
            ["activation_set.id"],
            name=op.f("fk_run_member_set_id_activation_set"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "set_id", name=op.f("pk_run_member")),
    )
    op.create_table(
        "neuron_match",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("other_set_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("max_corr", sa.Float(), nullable=True),
        sa.Column("best_layer", sa.Integer(), nullable=True),
        sa.Column("best_neuron", sa.Integer(), nullable=True),
        sa.Column("baseline_max_corr", sa.Float(), nullable=True),
        sa.Column("topk", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["other_set_id"],
            ["activation_set.id"],
            name=op.f("fk_neuron_match_other_set_id_activation_set"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["correlation_run.id"],
            name=op.f("fk_neuron_match_run_id_correlation_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["set_id"],
            ["activation_set.id"],
            name=op.f("fk_neuron_match_set_id_activation_set"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "set_id", "other_set_id", "layer", "neuron", name=op.f("pk_neuron_match")),
    )
    op.create_table(
        "universality",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("mean_max_corr", sa.Float(), nullable=True),
        sa.Column("min_max_corr", sa.Float(), nullable=True),
        sa.Column("mean_baseline", sa.Float(), nullable=True),
        sa.Column("excess_corr", sa.Float(), nullable=True),
        sa.Column("is_universal", sa.Boolean(), nullable=False),
        sa.Column("is_dead", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["correlation_run.id"],
            name=op.f("fk_universality_run_id_correlation_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["set_id"],
            ["activation_set.id"],
            name=op.f("fk_universality_set_id_activation_set"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "set_id", "layer", "neuron", name=op.f("pk_universality")),
    )
    with op.batch_alter_table("universality", schema=None) as batch_op:
        batch_op.create_index("ix_universality_set_layer", ["set_id", "layer"], unique=False)


def downgrade() -> None:
    op.drop_table("universality")
    op.drop_table("neuron_match")
    op.drop_table("run_member")
    op.drop_table("correlation_run")
