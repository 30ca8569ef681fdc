"""Logging setup: console + `<run_dir>/train.log` on rank 0, warnings only elsewhere."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(run_dir: str | None = None, *, rank: int = 0, filename: str = "train.log",
                  level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger once per process and return it.

    Rank 0 logs at `level` to stderr and (when `run_dir` is given) appends to
    `<run_dir>/<filename>`; other ranks log warnings and errors only, tagged with
    their rank, so a multi-GPU run prints one copy of every message.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gadms", False):
            root.removeHandler(handler)
            handler.close()
    fmt = _FORMAT if rank == 0 else f"[rank {rank}] " + _FORMAT
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    console._gadms = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if run_dir is not None and rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(run_dir, filename), encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler._gadms = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    return root
