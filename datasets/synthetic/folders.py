"""Output-folder safety: a tool writes into, and clears, only folders it made itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets.synthetic.writers import _dump_json, _write_text
from utils.errors import UserInputError
from utils.output_paths import check_output_path

#: File that marks a folder as made by :func:`generate` (JSON: generator version and
#: settings). Only a new or empty folder, or one carrying it, is written into or cleared.
MARKER = ".gadms-synthetic"


class OutputExistsError(UserInputError, FileExistsError):
    """An output folder holds something the tool did not make, or a result it may not replace."""


def check_claimable(folder: Path, marker: str = MARKER, made_by: str = "the synthetic data generator", *,
                    what: str = "output folder") -> None:
    """Refuse `folder` unless it is absent, empty, or carries `marker` (a folder we made).

    A tool writes into and clears only folders it made, so pointing it at a folder
    of the user's own files (e.g. the real data root) can never lose them. `what`
    names the folder in the messages as the user gave it (e.g. ``--out``).

    Raises:
        OutputExistsError: `folder` is a file, or a non-empty folder without `marker`.
        OutputPathError: `folder` cannot be created (a file in its way, no permission).
    """
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{what} {folder} is a file, not a folder; choose a new or empty folder")
    check_output_path(folder, what, folder=True)
    if folder.is_dir() and not (folder / marker).is_file() and any(folder.iterdir()):
        raise OutputExistsError(
            f"{folder} is not empty and was not made by {made_by} (it has no {marker} file), so nothing "
            f"in it is written or removed: choose a new or empty folder, or delete {folder} yourself"
        )


def claim_folder(folder: Path, marker: str, record: dict[str, Any], made_by: str) -> None:
    """Create `folder` (or accept an empty or marked one) and write `marker` holding `record` as JSON.

    Raises:
        OutputExistsError: see :func:`check_claimable`.
    """
    check_claimable(folder, marker, made_by)
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / marker, _dump_json(record, indent=2, sort_keys=True))
