"""The errors the command line reports as a single line (and exit status 2).

Every problem a user can fix (a config key, a tokenizer mismatch, an incomplete cache, an
unreachable teacher server) raises a subclass of `UserError`, with a message that names the
problem and the fix; `python -m distill` and `python -m distill.eval` print it as
`error: <message>`, without a traceback.
"""


class UserError(Exception):
    """A problem the user can fix; its message is one line naming the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as one line naming the key and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; the message says how to continue it (one line)."""


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message (or its type's name when the message is empty), for
    one-line reports of failures raised by libraries."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return text.splitlines()[0][:limit]
