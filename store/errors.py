"""The one exception type for user-facing mistakes; the CLI prints its message as one line."""


class ActdbError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable store), reported without a traceback."""


class SchemaBehindError(ActdbError):
    """The database schema is older than this version of actdb expects."""


class BusyError(ActdbError):
    """Another process already holds the work this process was asked to do."""
