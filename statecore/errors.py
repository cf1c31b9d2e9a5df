"""Exceptions whose message is meant for the user: what is wrong, and how to fix it."""


class StatecoreError(Exception):
    """Base class: the CLI prints the message on one line, the app shows it as an error box."""


class DataError(StatecoreError, ValueError):
    """The input data cannot be used as given; the message names the bad value and the fix."""


class CheckpointError(StatecoreError):
    """A run directory or checkpoint is missing, incomplete or does not match the data."""
