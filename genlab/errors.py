"""The one exception genlab raises for bad input: the CLI prints its message, no traceback."""


def first_line(error: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none: what a one-line error quotes."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


class GenlabError(Exception):
    """A problem the user can fix (config, data, checkpoint). The message says how."""

    exit_code = 1
    shared = False  # every process of a multi-process run meets it together: only rank 0 need say so


class Damaged(GenlabError):
    """A file genlab wrote cannot be read whole: truncated, changed on disk, or not genlab's."""


class Interrupted(GenlabError):
    """Training stopped by a signal after saving a checkpoint; exits 128 + the signal number."""

    shared = True

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_held: list = []  # how to let out what genlab.cli holds back of stderr while Hydra composes the command line


def hold(release) -> None:
    """genlab.cli holds stderr back while Hydra composes its command line; ``release`` lets it out."""
    _held[:] = [release]


def composed() -> None:
    """Hydra has composed the command line: what was held of stderr goes out, and genlab speaks for itself from
    here. Called by the first of genlab's code to run after composition: the task, or a sweep's start in the
    main process when its jobs run elsewhere (joblib, submitit)."""
    while _held:
        _held.pop()()
