"""Errors the user fixes by changing an input; entry points report them without a traceback."""


class UsageError(ValueError):
    """A bad argument, path or config value. The message names it and says what to change."""
