"""The one exception type for mistakes a user can fix (configuration, data, paths).

Entry points print a UserError's message without a traceback; any other exception is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """A problem in the user's configuration or inputs; the message says what to do."""
