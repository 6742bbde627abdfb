"""The one exception type that reaches the user as a message instead of a traceback."""


class InfuseError(Exception):
    """A problem the user can fix: bad input, a missing file, a config that cannot work.

    The message is shown as one paragraph by the CLI (no traceback unless ``--debug``), so it
    should say what was wrong, where (file, line, field) and what to do next.
    """
