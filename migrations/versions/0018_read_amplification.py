"""What a correlation run read: `correlation_run.bytes_read` (stored value bytes its readers returned, over every
pass) and `correlation_run.bytes_held` (stored value bytes of its sets' files). Their ratio is the run's read
amplification: 1.0 when every stored byte was read once (one read pass), the pass count when every pass read
every file. Runs recorded before have neither (NULL).

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (no table rebuild): the views over correlation_run stay as they are
    op.add_column("correlation_run", sa.Column("bytes_read", sa.BigInteger(), nullable=True))
    op.add_column("correlation_run", sa.Column("bytes_held", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE correlation_run DROP COLUMN bytes_held")
    op.execute("ALTER TABLE correlation_run DROP COLUMN bytes_read")
