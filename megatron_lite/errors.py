"""The one exception type for mistakes a user can fix (bad config, missing data, bad path).

The CLI prints a ``UserError`` as one line, ``error: <message>``, and exits 2 without a traceback;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that names it and the fix."""
