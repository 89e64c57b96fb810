"""Errors the user fixes by changing an input; entry points report them without a traceback."""


class UsageError(ValueError):
    """A bad argument, path or config value. The message names it and says what to change."""


class StageError(RuntimeError):
    """The stage cannot go on (e.g. a worker process died). The message says what happened and how to
    resume; entry points report it without a traceback and exit 1."""
