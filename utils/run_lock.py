"""One owner per run folder: an advisory lock taken when a run starts.

Two runs writing into one `output_dir` would interleave `metrics.jsonl`,
overwrite each other's checkpoints and reset each other's score cache.
`RunDirLock` holds an exclusive `flock(2)` on `<run_dir>/run.lock` for the life
of the run; the kernel releases it when the process ends, however it ends
(a SIGKILLed run never leaves a stale lock behind). The file itself stays and
names the last holder, so a refused second run can say who holds the folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from utils.errors import UserInputError
from utils.output_paths import unwritable_reason

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunDirBusyError", "RunDirLock", "RunDirUnusableError"]

LOCK_NAME = "run.lock"


class RunDirBusyError(UserInputError):
    """Another process holds the run folder."""


class RunDirUnusableError(UserInputError):
    """The run folder cannot be created or written (a file in its way, no permission)."""


class RunDirLock:
    """Exclusive ownership of a run folder (see the module docstring).

    Args:
        run_dir: The run folder (created if missing).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and record this process as its holder.

        Raises:
            RunDirBusyError: another process holds it (the message names it).
            RunDirUnusableError: the folder cannot be created or written.
        """
        if self._fd is not None:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            reason = unwritable_reason(self.run_dir, folder=True) or err.strerror or str(err)
            raise RunDirUnusableError(f"output_dir {self.run_dir} cannot be used: {reason}; "
                                      "choose another output_dir") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            raise RunDirBusyError(
                f"output_dir {self.run_dir} is in use by another run ({holder}); wait for it to finish, "
                "stop it, or choose another output_dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        data = json.dumps(holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        logger.debug("locked %s", self.path)

    def release(self) -> None:
        """Give the folder up (the file stays, naming the last holder)."""
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder.get('command', '?')}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"
