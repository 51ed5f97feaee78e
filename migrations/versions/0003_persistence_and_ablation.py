"""Persistence and ablation: persistence, neuron_emergence, ablation, ablation_neuron, neuron_match.self_corr.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "neuron_emergence",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("control", sa.String(length=20), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("emergence_step", sa.BigInteger(), nullable=True),
        sa.Column("steps", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_neuron_emergence_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_neuron_emergence_model_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "model_id", "dataset_id", "control", "layer", "neuron", name=op.f("pk_neuron_emergence")
        ),
    )
    op.create_table(
        "ablation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("selector", sa.Text(), nullable=False),
        sa.Column("neurons", sa.Text(), nullable=False),
        sa.Column("n_neurons", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("base_loss", sa.Float(), nullable=False),
        sa.Column("ablated_loss", sa.Float(), nullable=True),
        sa.Column("delta", sa.Float(), nullable=True),
        sa.Column("n_controls", sa.Integer(), nullable=False),
        sa.Column("control_mean", sa.Float(), nullable=True),
        sa.Column("control_std", sa.Float(), nullable=True),
        sa.Column("control_ci_low", sa.Float(), nullable=True),
        sa.Column("control_ci_high", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("each", sa.Boolean(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("forward_passes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"], ["checkpoint.id"], name=op.f("fk_ablation_checkpoint_id_checkpoint"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_ablation_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["correlation_run.id"], name=op.f("fk_ablation_run_id_correlation_run"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ablation")),
    )
    op.create_table(
        "persistence",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("control", sa.String(length=20), nullable=False),
        sa.Column("from_step", sa.BigInteger(), nullable=False),
        sa.Column("to_step", sa.BigInteger(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("n_universal_from", sa.Integer(), nullable=False),
        sa.Column("n_universal_to", sa.Integer(), nullable=False),
        sa.Column("n_kept", sa.Integer(), nullable=False),
        sa.Column("p_persist", sa.Float(), nullable=True),
        sa.Column("jaccard", sa.Float(), nullable=True),
        sa.Column("mean_self_corr", sa.Float(), nullable=True),
        sa.Column("from_run_id", sa.Integer(), nullable=False),
        sa.Column("to_run_id", sa.Integer(), nullable=False),
        sa.Column("self_run_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_persistence_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["from_run_id"],
            ["correlation_run.id"],
            name=op.f("fk_persistence_from_run_id_correlation_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_persistence_model_id_model"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["self_run_id"],
            ["correlation_run.id"],
            name=op.f("fk_persistence_self_run_id_correlation_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["to_run_id"],
            ["correlation_run.id"],
            name=op.f("fk_persistence_to_run_id_correlation_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_persistence")),
        sa.UniqueConstraint(
            "model_id",
            "dataset_id",
            "control",
            "from_step",
            "to_step",
            "layer",
            name="uq_persistence_key",
        ),
    )
    op.create_table(
        "ablation_neuron",
        sa.Column("ablation_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("ablated_loss", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ablation_id"], ["ablation.id"], name=op.f("fk_ablation_neuron_ablation_id_ablation"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("ablation_id", "layer", "neuron", name=op.f("pk_ablation_neuron")),
    )
    with op.batch_alter_table("neuron_match", schema=None) as batch_op:
        batch_op.add_column(sa.Column("self_corr", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("neuron_match", schema=None) as batch_op:
        batch_op.drop_column("self_corr")

    op.drop_table("ablation_neuron")
    op.drop_table("persistence")
    op.drop_table("ablation")
    op.drop_table("neuron_emergence")
