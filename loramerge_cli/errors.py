"""Errors that reach the user as one line (exit code 1), never as a traceback."""


class LoramergeError(Exception):
    """A user or data error: bad input, refused adapter, conflicting options."""
