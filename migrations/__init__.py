"""Alembic environment and revisions: the only way actdb's schema changes."""
