"""The one exception genlab raises for bad input: the CLI prints its message, no traceback."""


class GenlabError(Exception):
    """A problem the user can fix (config, data, checkpoint). The message says how."""
