"""Relocatable stores and checkpoint identity.

- `dataset.path` and `activation_set.path` become relative to the store folder (`datasets/<name>.tokens.h5`,
  `activations/<model>/step-<N>/<dataset>.<hook>.h5`), so a store copied or moved with its SQLite file works.
- `checkpoint.weights_sha256` fingerprints the weights a step was ingested from.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# How many trailing components of an absolute path form the relative one (the layout actdb has always used).
TAIL = {"dataset": 2, "activation_set": 4}


def upgrade() -> None:
    conn = op.get_bind()
    for table, keep in TAIL.items():
        for row_id, path in conn.execute(sa.text(f"SELECT id, path FROM {table}")).all():
            if path.startswith("/"):
                relative = "/".join(path.split("/")[-keep:])
                conn.execute(sa.text(f"UPDATE {table} SET path = :p WHERE id = :i"), {"p": relative, "i": row_id})
    op.add_column("checkpoint", sa.Column("weights_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE checkpoint DROP COLUMN weights_sha256")
