"""The one exception type for mistakes a user can fix (configuration, data, paths).

Entry points print a UserError's message without a traceback; any other exception is a bug
and keeps its traceback.
"""

import functools
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A problem in the user's configuration or inputs; the message says what to do."""


def reports_user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Decorates an entry point's main(argv) -> exit code: a UserError (gin errors included) is
    printed as "error: <message>" on stderr and exits with 2; any other exception keeps its traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            # gin appends "\n  In call to configurable 'f' (<function ...>)" to errors raised inside a
            # configurable: the message already names what was wrong, so the line stays one line.
            message = str(e).split("\n  In call to configurable")[0]
            print(f"error: {message}", file=sys.stderr)
            return 2

    return wrapped
