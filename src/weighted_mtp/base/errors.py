"""The one exception type for bad input.

:class:`UserError` (and its subclasses such as ``ConfigError``, ``StorageError``,
``JsonlError``, ``CheckpointError``) means "the user can fix this": a wrong flag, a bad config
key, a missing or malformed file. The ``wmtp`` command prints its message as one line and exits
with code 1. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can act on; the message is one line (with ``file:line`` when known)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named, or that storage should hold, does not exist.

    Also a :class:`FileNotFoundError`, so callers that handle a missing file keep working.
    """
