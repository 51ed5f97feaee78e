"""Function- and weight-space trajectories (`actdb trajectories`): one `trajectory_run` per request, its pairwise
values in long format (`trajectory_value`: win rate, disagreement, ensemble gain, weight cosines, the map's
distance) and per-checkpoint values (`trajectory_point`: accuracy, mean loss, Bradley-Terry strength, map
coordinates), with the views `v_trajectories` and `v_trajectory_points`.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

V_TRAJECTORIES = """
    SELECT tv.run_id, d.name AS dataset, m.name AS model, c.step, om.name AS other_model, oc.step AS other_step,
           tv.metric, tv.value, tv.n_targets
    FROM trajectory_value tv
    JOIN trajectory_run r ON r.id = tv.run_id
    JOIN dataset d ON d.id = r.dataset_id
    JOIN checkpoint c ON c.id = tv.checkpoint_id
    JOIN model m ON m.id = c.model_id
    JOIN checkpoint oc ON oc.id = tv.other_checkpoint_id
    JOIN model om ON om.id = oc.model_id
    WHERE r.status = 'complete'
"""

V_TRAJECTORY_POINTS = """
    SELECT tp.run_id, d.name AS dataset, m.name AS model, c.step, tp.n_targets, tp.top1_accuracy, tp.mean_loss,
           tp.bt_strength, r.distance, r.embedding, tp.map_x, tp.map_y
    FROM trajectory_point tp
    JOIN trajectory_run r ON r.id = tp.run_id
    JOIN dataset d ON d.id = r.dataset_id
    JOIN checkpoint c ON c.id = tp.checkpoint_id
    JOIN model m ON m.id = c.model_id
    WHERE r.status = 'complete'
"""


def _run_state_columns() -> list[sa.Column]:
    return [
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "trajectory_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("sets", sa.Text(), nullable=False),
        sa.Column("eps", sa.Float(), nullable=False),
        sa.Column("distance", sa.String(length=20), nullable=False),
        sa.Column("embedding", sa.String(length=20), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("exact_tokens", sa.BigInteger(), nullable=True),
        sa.Column("weights", sa.Boolean(), nullable=False),
        sa.Column("reference_checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("n_checkpoints", sa.Integer(), nullable=True),
        sa.Column("n_targets", sa.BigInteger(), nullable=True),
        sa.Column("n_triples", sa.Integer(), nullable=True),
        sa.Column("n_nontransitive", sa.Integer(), nullable=True),
        sa.Column("map_stress", sa.Float(), nullable=True),
        *_run_state_columns(),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_trajectory_run_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["reference_checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_trajectory_run_reference_checkpoint_id_checkpoint"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trajectory_run")),
    )
    op.create_index(op.f("ix_trajectory_run_request_key"), "trajectory_run", ["request_key"], unique=False)
    where = sa.text("status = 'running'")
    op.create_index(
        "uq_trajectory_run_running_request",
        "trajectory_run",
        ["request_key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )
    op.create_table(
        "trajectory_value",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("other_checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=40), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("n_targets", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["trajectory_run.id"],
            name=op.f("fk_trajectory_value_run_id_trajectory_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_trajectory_value_checkpoint_id_checkpoint"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["other_checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_trajectory_value_other_checkpoint_id_checkpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "checkpoint_id", "other_checkpoint_id", "metric", name=op.f("pk_trajectory_value")
        ),
    )
    op.create_table(
        "trajectory_point",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("n_targets", sa.BigInteger(), nullable=True),
        sa.Column("top1_accuracy", sa.Float(), nullable=True),
        sa.Column("mean_loss", sa.Float(), nullable=True),
        sa.Column("bt_strength", sa.Float(), nullable=True),
        sa.Column("map_x", sa.Float(), nullable=True),
        sa.Column("map_y", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["trajectory_run.id"],
            name=op.f("fk_trajectory_point_run_id_trajectory_run"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_trajectory_point_checkpoint_id_checkpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "checkpoint_id", name=op.f("pk_trajectory_point")),
    )
    op.execute(f"CREATE VIEW v_trajectories AS {V_TRAJECTORIES}")
    op.execute(f"CREATE VIEW v_trajectory_points AS {V_TRAJECTORY_POINTS}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_trajectory_points")
    op.execute("DROP VIEW IF EXISTS v_trajectories")
    op.drop_table("trajectory_point")
    op.drop_table("trajectory_value")
    op.drop_index("uq_trajectory_run_running_request", table_name="trajectory_run")
    op.drop_index(op.f("ix_trajectory_run_request_key"), table_name="trajectory_run")
    op.drop_table("trajectory_run")
