"""The one exception genlab raises for bad input: the CLI prints its message, no traceback."""


class GenlabError(Exception):
    """A problem the user can fix (config, data, checkpoint). The message says how."""

    exit_code = 1
    shared = False  # every process of a multi-process run meets it together: only rank 0 need say so


class Interrupted(GenlabError):
    """Training stopped by a signal after saving a checkpoint; exits 128 + the signal number."""

    shared = True

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
