"""Errors a user can fix: the CLIs print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad configuration, bad input files, unreachable services: anything that is not a bug."""
