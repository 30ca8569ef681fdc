"""The run's metric log, `<run_dir>/metrics.jsonl`: one JSON object per line.

The training loop appends `train` and `eval` records, tools/test.py `test`
records; a resumed run supersedes the records of the epochs it redoes, so every
reader (tools/plot_curves.py, tools/make_tables.py) sees one history.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from utils.checkpoint import atomic_write

__all__ = ["METRICS_FILE", "append_metrics", "is_number", "read_metrics", "supersede_metrics"]

#: The log's file name inside a run directory.
METRICS_FILE = "metrics.jsonl"


def append_metrics(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line to `<run_dir>/metrics.jsonl` (flushed and fsynced)."""
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def supersede_metrics(run_dir: str | os.PathLike, from_epoch: int,
                      kinds: tuple[str, ...] = ("train", "eval")) -> int:
    """Drop the records of the per-epoch `kinds` (training and evaluation by default) of
    epochs >= `from_epoch` from `metrics.jsonl`.

    Called when a run resumes at `from_epoch`: those epochs are about to be redone
    and will write new records, so every reader sees one history. Records of
    other kinds (e.g. `test` from tools/test.py) and lines torn by a crash mid-write
    are handled too: the first are kept, the second dropped. The file is replaced
    atomically. Returns the number of lines dropped.
    """
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        redone = record.get("type") in kinds and isinstance(record.get("epoch"), int) \
            and record["epoch"] >= from_epoch
        if not redone:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        atomic_write(path, lambda f: f.write("".join(kept).encode("utf-8")))
    return len(lines) - len(kept)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON records of a `metrics.jsonl` file (blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not a JSON object (names the file and line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (a run directory holds metrics.jsonl once an epoch has finished)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a metric value must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
