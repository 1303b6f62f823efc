"""The one exception type for mistakes a user can fix (bad recipe, data path, checkpoint...).

The command line prints its message as one line and exits with code 2; Python callers get the
exception. The message names the thing that is wrong and how to fix it.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that says what to change."""
