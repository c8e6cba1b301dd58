"""The base class of the errors a user can fix: a bad config, bad data, a checkpoint that does not
fit, a diverged run. Every command-line tool (`entry.run`) prints their message and exits with
status 2 instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input, explained by its message."""
