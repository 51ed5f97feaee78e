"""The exception types for user-facing problems; the CLI prints their message as one line."""

from __future__ import annotations


class ActdbError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable store), reported without a traceback."""


class SchemaBehindError(ActdbError):
    """The database schema is older than this version of actdb expects."""


class BusyError(ActdbError):
    """Another process already holds the work this process was asked to do."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (of its DB-API cause for SQLAlchemy errors), or its
    type name: what a one-line error or a run's `error` column shows."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
