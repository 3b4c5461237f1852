"""The framework's exceptions: one small hierarchy, raised by library code.

Library code never ends the process. Only the command-line entry points (``main.py``,
``python -m utils.evaluate``, ``python -m datasets.synthetic``) catch ``PoseError`` and print its
message as one line, ``error: <message>``, with exit status 1. ``str(error)`` is that message
without the ``error:`` prefix: it names the file, the key or the option, and what is wrong.
"""
import difflib


class PoseError(Exception):
    """Base class: a user-facing problem, described in one line."""

    def __init__(self, message):
        message = ' '.join(str(message).split('\n'))      # always one line
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


class ConfigError(PoseError):
    """An option, a config file or a registry name is wrong."""


class DatasetError(PoseError):
    """A dataset file is missing, unreadable or malformed (annotation, image, prediction file)."""


class CheckpointError(PoseError):
    """A checkpoint cannot be read or does not fit the configured model."""


class TrainingError(PoseError):
    """A run cannot start or cannot go on (NaN loss, a run folder in use, nothing to do)."""


class StorageError(PoseError):
    """A file could not be written (no space left on the device, no permission, ...); the
    previous version of the file is intact."""


def did_you_mean(name, choices):
    """'' or "; did you mean 'X'?" for the closest of ``choices`` (case-insensitive)."""
    choices = list(choices)
    lower = {c.lower(): c for c in choices}
    if str(name).lower() in lower:
        return f'; did you mean {lower[str(name).lower()]!r}?'
    close = difflib.get_close_matches(str(name), choices, n=1)
    if not close:
        close = difflib.get_close_matches(str(name).lower(), list(lower), n=1)
        close = [lower[c] for c in close]
    return f'; did you mean {close[0]!r}?' if close else ''
