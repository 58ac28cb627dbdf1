"""The one exception type for user mistakes.

The CLI prints a :class:`DistrainError` as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class DistrainError(Exception):
    """A mistake in the user's config, files or command line, with a one-line explanation."""
