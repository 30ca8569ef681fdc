"""The project's user-facing errors.

`UserInputError` is a problem with something the user gave: a config key, an
annotation record, an image, a checkpoint, a command-line argument. Its message
names the thing and says what to do, so the entry points print it as one line
(`error: ...`, exit status 2) instead of a traceback; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserInputError"]


class UserInputError(Exception):
    """Bad user input: the message names the file/record/key and what to do."""
