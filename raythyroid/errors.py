"""Errors a user can fix (bad path, bad flag, bad config): the CLI prints them as one line, exit 2."""


class UserError(Exception):
    """A mistake in what the user asked for, not a bug: reported without a traceback."""
