"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class InputError(Exception):
    """A bad input file or option: the message names the file and what is wrong with it."""


class NoPersonError(InputError):
    """No person was found where one was needed."""
