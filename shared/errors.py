"""Errors a user can fix: the CLIs print them as one line and exit non-zero."""

ECHO_CHARS = 64  # how much of a client's own input an error message repeats
# what every CLI exits with: a usage or input error; interrupted (128 + SIGINT, as a shell reports Ctrl-C)
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class UserError(Exception):
    """Bad configuration, bad input files, unreachable services: anything that is not a bug."""


def shown(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages that echo a client's input (a model
    name, a header value, a shape) must not send back a 60 KB name or a 1 MB header whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked when it was (a field name a client chose)."""
    return text if len(text) <= limit else f"{text[:limit]}…"
