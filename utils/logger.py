"""Logging setup: console + `<run_dir>/train.log` on rank 0, warnings only elsewhere."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _chosen_console_level(root: logging.Logger) -> int | None:
    """The console level an earlier call was given explicitly (`console_level`), or None."""
    for handler in root.handlers:
        if getattr(handler, "_gadms", False) and getattr(handler, "_gadms_chosen", False):
            return handler.level
    return None


def setup_logging(run_dir: str | None = None, *, rank: int = 0, filename: str = "train.log",
                  level: int = logging.INFO, console_level: int | None = None) -> logging.Logger:
    """Configure the root logger and return it; later calls replace the handlers of earlier ones.

    Rank 0 logs at `level` to `<run_dir>/<filename>` (when `run_dir` is given) and
    to stderr; other ranks log warnings and errors only, tagged with their rank,
    so a multi-GPU run prints one copy of every message.

    Args:
        console_level: The stderr level on rank 0. A level given here is kept by
            later calls that give none: a tool that wants a quiet console (the
            demo's outline) keeps it when the Trainer sets up its run log.
            None = the level an earlier call chose, else `level`.
    """
    root = logging.getLogger()
    chosen = console_level is not None
    if console_level is None:
        console_level = _chosen_console_level(root)
        chosen = console_level is not None
    for handler in list(root.handlers):
        if getattr(handler, "_gadms", False):
            root.removeHandler(handler)
            handler.close()
    if rank != 0:
        level = console_level = logging.WARNING
    elif console_level is None:
        console_level = level
    fmt = _FORMAT if rank == 0 else f"[rank {rank}] " + _FORMAT
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    console.setLevel(console_level)
    console._gadms = True  # type: ignore[attr-defined]
    console._gadms_chosen = chosen  # type: ignore[attr-defined]
    root.addHandler(console)
    if run_dir is not None and rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(run_dir, filename), encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler.setLevel(level)
        file_handler._gadms = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
        root.setLevel(min(level, console_level))
    else:
        root.setLevel(console_level)
    return root
