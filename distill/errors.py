"""The one error type the command line reports as a single line (and exit code 2).

Every problem a user can fix (a config key, a tokenizer mismatch, an incomplete cache, an
unreachable teacher server) raises a subclass of `UserError`, with a message that names the
problem and the fix; `python -m distill` prints it as `error: <message>`, without a traceback.
"""


class UserError(Exception):
    """A problem the user can fix; its message is one line naming the problem and the fix."""
