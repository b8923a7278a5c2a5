"""The one exception type for problems the user can fix (bad input, missing weights, ...).

The CLI prints it as a single line and exits with status 1; anything else is a bug and
keeps its traceback.
"""


class CleanloopError(Exception):
    """A user-facing error: the message names the file, the row or column, and what to do."""
