"""Forced re-ingests recorded as attempts (the set stays complete until its replacement is), and the store's
identity binding the database to its folder.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_attempt",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(length=20), nullable=False),
        sa.Column("tokens_done", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["set_id"], ["activation_set.id"], name=op.f("fk_ingest_attempt_set_id_activation_set"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_attempt")),
    )
    op.create_index(op.f("ix_ingest_attempt_request_key"), "ingest_attempt", ["request_key"], unique=False)
    op.create_index(op.f("ix_ingest_attempt_set_id"), "ingest_attempt", ["set_id"], unique=False)
    where = sa.text("status = 'running'")
    op.create_index(
        "uq_ingest_attempt_running_request",
        "ingest_attempt",
        ["request_key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )
    op.create_table(
        "store_identity",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("store_id", sa.String(length=36), nullable=False),
        sa.Column("home", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_store_identity")),
        sa.UniqueConstraint("store_id", name=op.f("uq_store_identity_store_id")),
    )


def downgrade() -> None:
    op.drop_table("store_identity")
    op.drop_index("uq_ingest_attempt_running_request", table_name="ingest_attempt")
    op.drop_index(op.f("ix_ingest_attempt_set_id"), table_name="ingest_attempt")
    op.drop_index(op.f("ix_ingest_attempt_request_key"), table_name="ingest_attempt")
    op.drop_table("ingest_attempt")
