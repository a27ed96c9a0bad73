"""The one exception type for problems the user can fix (bad files, bad flags).

The CLI prints its message as one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Something the user gave us is wrong; the message says what and what to do."""
