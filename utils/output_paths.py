"""Checks that an output path can be written, made before the work that produces the output.

A tool that runs for minutes and then finds a file where its output folder should
be has wasted those minutes; one that fails inside ``mkdir`` shows a traceback.
These checks name the path, what is in its way and what to do, up front.
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.errors import UserInputError

__all__ = ["OutputPathError", "check_output_path", "unwritable_reason"]


class OutputPathError(UserInputError):
    """An output path that cannot be written: a file where a folder should be, a folder where a file should be,
    or no permission."""


def unwritable_reason(path: str | os.PathLike, *, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (or, with ``folder``, created as a folder); None when it can.

    Checks what is on disk now: ``path`` itself, then its nearest existing ancestor,
    which must be a folder this process may write into.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    if path.is_dir():
        if not folder:
            return f"{path} is a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"no permission to write in {path}"
    if path.exists():
        return f"{path} is a file, not a folder" if folder else (
            None if os.access(path, os.W_OK) else f"no permission to write {path}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"no permission to write in {parent}"
            return None
    return None


def check_output_path(path: str | os.PathLike, what: str, *, folder: bool = False) -> Path:
    """Return ``path`` when it can be written (see :func:`unwritable_reason`).

    Args:
        path: the output file or folder.
        what: how the user gave it, for the message (e.g. ``--json``, ``output_dir``).
        folder: ``path`` is a folder to create (else a file).

    Raises:
        OutputPathError: naming ``what``, the path and what is in the way.
    """
    reason = unwritable_reason(path, folder=folder)
    if reason is not None:
        raise OutputPathError(f"{what} {os.fspath(path)} cannot be written: {reason}; choose another path")
    return Path(path)
