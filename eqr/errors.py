"""The one user-facing error type: its message is a single line saying what, where and how to fix."""


class EqRError(Exception):
    """An error caused by user input (a path, a flag, a file). The CLI prints it as one line, exit 2."""

    exit_code = 2


class CheckpointError(EqRError):
    """A checkpoint file that is missing, malformed, unsafe or does not fit the model."""
