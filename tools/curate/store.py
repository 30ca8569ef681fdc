"""Resumable stage storage: sharded append-only JSONL records, atomic files, manifests.

Every stage writes into its own output folder::

    <out>/manifest.json        settings the stage was started with (a resume must match)
    <out>/part-00000.jsonl     one JSON record per finished item, rotated every N records
    <out>/failures.jsonl       items that failed for good, with a reason
    <out>/stats.json           summary, recomputed from the records at the end of every run
    <out>/.tmp/                temporary files, renamed into place when complete
    <out>/.lock                held while the stage runs (a second process refuses to start)

Crash safety: an item's files are written to ``.tmp/`` and renamed into place
before its record line is appended, and a record line is one ``write`` of a
complete line. After ``kill -9`` the worst left behind is a partial last line,
which is truncated on the next start, and files of in-flight items, which are
rewritten identically when those items are redone. The set of keys in the
records (and failures) is the done-list: finished items are never redone, so
records never repeat.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATS = "stats.json"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
RECORDS_PREFIX = "part"
FAILURES_NAME = "failures"
#: Fault injection for the crash tests: ``<stage>:<n>[:torn]`` kills the process (SIGKILL) at the
#: (n+1)-th record append of that stage, after writing half of the line when ``torn`` is given.
CRASH_ENV = "GADMS_CURATE_CRASH"
_SHARD_NAME = re.compile(r"^(?P<prefix>[A-Za-z_]+)-(?P<index>\d{5})\.jsonl$")


class StageError(RuntimeError):
    """A user-facing problem (bad input, wrong settings, missing files) that stops a stage."""


def sha1_hex(text: str) -> str:
    """Hex SHA-1 of a UTF-8 string (the item keys of every stage)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def item_rng(seed: int, *parts: object) -> random.Random:
    """A random generator that depends only on the seed and the item, not on scheduling order."""
    return random.Random(sha1_hex(":".join([str(seed), *map(str, parts)])))


def item_seed(seed: int, *parts: object) -> int:
    """A 31-bit integer seed derived from the seed and the item (e.g. for a server's sampler)."""
    return int(sha1_hex(":".join([str(seed), *map(str, parts)]))[:8], 16) & 0x7FFFFFFF


def atomic_write_bytes(path: str, data: bytes, tmp_dir: str | None = None, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (readers never see a partial file).

    Args:
        path: destination file; its folder is created.
        data: file content.
        tmp_dir: where the temporary file goes (same filesystem as ``path``); default: next to it.
        fsync: flush to stable storage before the rename (survives power loss, not only a killed process).
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp_folder = tmp_dir or folder
    os.makedirs(tmp_folder, exist_ok=True)
    # pid + thread id: concurrent writers (thread pools) never share a temporary name.
    tmp = os.path.join(tmp_folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any, tmp_dir: str | None = None, fsync: bool = False) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    data = (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write_bytes(path, data, tmp_dir, fsync)


def dump_record(record: dict[str, Any]) -> bytes:
    """One JSONL line (key-sorted, so equal records are equal bytes)."""
    return (json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class _CrashPoint:
    """Parses ``GADMS_CURATE_CRASH`` for one stage (see ``CRASH_ENV``)."""

    def __init__(self, stage: str) -> None:
        self.after: int | None = None
        self.torn = False
        spec = os.environ.get(CRASH_ENV, "")
        if not spec:
            return
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit() or (len(parts) == 3 and parts[2] != "torn"):
            raise StageError(f"{CRASH_ENV}={spec!r}: expected '<stage>:<n>' or '<stage>:<n>:torn'")
        if parts[0] == stage:
            self.after = int(parts[1])
            self.torn = len(parts) == 3

    def check(self, appended: int, fd: int, line: bytes) -> None:
        if self.after is None or appended < self.after:
            return
        if self.torn:
            os.write(fd, line[: max(1, len(line) // 2)])
        os.kill(os.getpid(), signal.SIGKILL)


class RecordStore:
    """Append-only JSONL records in shards ``<prefix>-00000.jsonl`` (or one ``<prefix>.jsonl``).

    Opening the store recovers from a crash: a partial (or unparsable) last
    line of the last shard is truncated away. Keys already present form the
    done-list.

    Args:
        folder: stage output folder.
        prefix: file name prefix.
        shard_size: records per shard before rotating; 0 = a single file ``<prefix>.jsonl``.
        key_field: the record field that identifies an item.
        stage: stage name (for fault injection).
        fsync: fsync after every record.
    """

    def __init__(self, folder: str, prefix: str = RECORDS_PREFIX, shard_size: int = 10000,
                 key_field: str = "key", stage: str = "", fsync: bool = False) -> None:
        if shard_size < 0:
            raise StageError(f"shard size must be >= 0, got {shard_size}")
        self.folder = folder
        self.prefix = prefix
        self.shard_size = shard_size
        self.key_field = key_field
        self.fsync = fsync
        self.keys: set[str] = set()
        self._fd: int | None = None
        self._shard_index = 0
        self._in_shard = 0
        self._appended = 0
        self._crash = _CrashPoint(stage)
        os.makedirs(folder, exist_ok=True)
        self._recover()

    # ---- files

    def shard_path(self, index: int) -> str:
        if self.shard_size == 0:
            return os.path.join(self.folder, f"{self.prefix}.jsonl")
        return os.path.join(self.folder, f"{self.prefix}-{index:05d}.jsonl")

    def paths(self) -> list[str]:
        """Existing record files in order."""
        return record_files(self.folder, self.prefix)

    def _recover(self) -> None:
        paths = self.paths()
        for n, path in enumerate(paths):
            last = n == len(paths) - 1
            count = 0
            for record in _read_lines(path, self.key_field, repair=last):
                self.keys.add(record[self.key_field])
                count += 1
            if last:
                self._in_shard = count
                self._shard_index = _shard_number(path)
        if paths and self.shard_size and self._in_shard >= self.shard_size:
            self._shard_index += 1
            self._in_shard = 0

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    # ---- writing

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (its files must already be in place); duplicates are refused."""
        key = record.get(self.key_field)
        if not isinstance(key, str) or not key:
            raise StageError(f"record without a string {self.key_field!r}: {record!r:.200}")
        if key in self.keys:
            raise StageError(f"duplicate record key {key!r} in {self.folder}")
        if self.shard_size and self._in_shard >= self.shard_size:
            self._close_fd()
            self._shard_index += 1
            self._in_shard = 0
        if self._fd is None:
            self._fd = os.open(self.shard_path(self._shard_index), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = dump_record(record)
        self._crash.check(self._appended, self._fd, line)
        # One write of the whole line: a killed process leaves either nothing or a prefix of it.
        written = os.write(self._fd, line)
        if written != len(line):
            raise StageError(f"short write to {self.shard_path(self._shard_index)} ({written} of {len(line)} bytes)")
        if self.fsync:
            os.fsync(self._fd)
        self.keys.add(key)
        self._in_shard += 1
        self._appended += 1

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_fd()


def _shard_number(path: str) -> int:
    match = _SHARD_NAME.match(os.path.basename(path))
    return int(match.group("index")) if match else 0


def record_files(folder: str, prefix: str = RECORDS_PREFIX) -> list[str]:
    """The record files of ``prefix`` in ``folder``, in shard order."""
    if not os.path.isdir(folder):
        return []
    single = os.path.join(folder, f"{prefix}.jsonl")
    names = sorted(n for n in os.listdir(folder)
                   if (m := _SHARD_NAME.match(n)) is not None and m.group("prefix") == prefix)
    paths = [os.path.join(folder, n) for n in names]
    if os.path.isfile(single):
        paths.insert(0, single)
    return paths


def _read_lines(path: str, key_field: str, repair: bool) -> Iterator[dict[str, Any]]:
    """Records of one JSONL file; with ``repair`` a damaged tail is truncated, else skipped with a warning."""
    with open(path, "rb") as f:
        data = f.read()
    good_end = 0
    lines = data.split(b"\n")
    # The piece after the last newline is empty for an intact file, or a torn line.
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get(key_field), str):
                raise ValueError(f"expected an object with a string {key_field!r}")
        except ValueError as e:
            if number == len(complete) and not tail:
                # A damaged final line is what a crash leaves behind; anything earlier is corruption.
                tail = line
                break
            raise StageError(f"{path} line {number}: unreadable record ({e}); the file was damaged "
                             "or edited by hand - remove the line or the stage folder") from e
        good_end += len(line) + 1
        yield record
    if tail:
        if repair:
            logger.warning("%s: dropping a partial last record (%d bytes) left by an interrupted run", path, len(tail))
            with open(path, "r+b") as f:
                f.truncate(good_end)
        else:
            logger.warning("%s: ignoring a partial last record (the stage was interrupted)", path)


def iter_records(folder: str, prefix: str = RECORDS_PREFIX, key_field: str = "key") -> Iterator[dict[str, Any]]:
    """Read the records of a stage folder (read-only; a torn last line is skipped)."""
    for path in record_files(folder, prefix):
        yield from _read_lines(path, key_field, repair=False)


def latest_failures(folder: str, succeeded: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Last failure record per key, without keys that later succeeded."""
    failures: dict[str, dict[str, Any]] = {}
    for record in iter_records(folder, FAILURES_NAME):
        failures[record["key"]] = record
    for key in succeeded:
        failures.pop(key, None)
    return failures


def read_manifest(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable manifest ({e})") from e


def require_stage(folder: str, stage: str, flag: str) -> dict[str, Any]:
    """Check that ``folder`` is the output of ``stage``; return its manifest."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise StageError(f"{flag} {folder}: not a curation stage folder (no {MANIFEST}); expected the --out folder "
                         f"of the '{stage}' stage")
    if manifest.get("stage") != stage:
        raise StageError(f"{flag} {folder}: holds the output of the '{manifest.get('stage')}' stage, expected "
                         f"'{stage}'")
    return manifest


class StageDir:
    """A stage's output folder while the stage runs: lock, manifest check, records and failures.

    Args:
        out: output folder (created).
        stage: stage name, recorded in the manifest.
        params: settings that determine the output; a resume with different values is refused.
        inputs: input folders/files (informational, used by later stages to find their sources).
        shard_size: records per shard.
        fsync: fsync files and records.
    """

    def __init__(self, out: str, stage: str, params: dict[str, Any], inputs: dict[str, Any] | None = None,
                 shard_size: int = 10000, fsync: bool = False) -> None:
        self.out = os.path.abspath(out)
        self.stage = stage
        self.fsync = fsync
        os.makedirs(self.out, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            raise StageError(f"{self.out} is in use by another running '{stage}' process") from e
        try:
            self._check_manifest(params, inputs or {})
            self.tmp = os.path.join(self.out, TMP_DIR)
            # Leftovers of a killed run: temporary files are never referenced by a record.
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.makedirs(self.tmp)
            self.records = RecordStore(self.out, RECORDS_PREFIX, shard_size, stage=stage, fsync=fsync)
            self.failures = RecordStore(self.out, FAILURES_NAME, 0, fsync=fsync)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _check_manifest(self, params: dict[str, Any], inputs: dict[str, Any]) -> None:
        manifest = read_manifest(self.out)
        params = json.loads(json.dumps(params))  # normalise tuples etc. to their JSON form
        if manifest is not None:
            if manifest.get("stage") != self.stage:
                raise StageError(f"--out {self.out} holds the output of the '{manifest.get('stage')}' stage; "
                                 f"use a separate folder per stage")
            old = manifest.get("params", {})
            changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            if changed:
                detail = "; ".join(f"{k}: {old.get(k)!r} -> {params.get(k)!r}" for k in changed)
                raise StageError(f"{self.out} was started with different settings ({detail}); rerun with the "
                                 "original settings to resume, or use a new --out folder")
        atomic_write_json(os.path.join(self.out, MANIFEST), {"stage": self.stage, "params": params, "inputs": inputs})

    def path(self, relative: str) -> str:
        return os.path.join(self.out, relative)

    def write_file(self, relative: str, data: bytes) -> None:
        """Atomically write an item file under the stage folder."""
        atomic_write_bytes(self.path(relative), data, self.tmp, self.fsync)

    def done(self, retry_failed: bool = False) -> set[str]:
        """Keys not to process again: all records, plus failures unless ``retry_failed``."""
        return set(self.records.keys) if retry_failed else self.records.keys | self.failures.keys

    def fail(self, key: str, reason: str, detail: str = "", **extra: Any) -> None:
        """Record a final failure of an item (not fatal for the stage)."""
        if key in self.failures.keys:
            # --retry-failed: the failures file keeps the history; the latest entry wins.
            self.failures.keys.discard(key)
        self.failures.append({"key": key, "reason": reason, "detail": detail[:500], **extra})

    def write_stats(self, stats: dict[str, Any]) -> None:
        atomic_write_json(self.path(STATS), stats, self.tmp, self.fsync)

    def close(self) -> None:
        self.records.close()
        self.failures.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.close(self._lock_fd)

    def __enter__(self) -> StageDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
