"""The one exception type users see as a one-line error (exit code 2) from `lmforge`."""


class LmforgeError(Exception):
    """A problem with the user's input: a file, a config field, a checkpoint.

    The message names the file or field and says what is wrong. The CLI prints
    it on one line and exits with code 2, with no traceback.
    """


def warn(message: str) -> None:
    """A one-line warning on stderr: something the user should know that does not stop the command."""
    import sys

    print(f"lmforge: warning: {message}", file=sys.stderr, flush=True)
