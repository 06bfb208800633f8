"""The one exception type ccli shows to users.

Anything raised as `CcliError` is a problem with the user's input or environment: the CLI prints its
message on one line and exits non-zero, without a traceback. Everything else is a bug in ccli.
"""


class CcliError(Exception):
    """A user-facing error whose message is one complete line that says what to do."""

    exit_code = 2
