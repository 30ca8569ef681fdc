"""What the command-line tools share: the user-facing error and its exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from processor.evaluate import read_metrics

__all__ = ["ToolError", "read_records", "run_tool"]


class ToolError(Exception):
    """A user-facing problem (bad argument, missing file); printed as `error: ...`, exit status 2."""


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; problems become ToolErrors naming the file and line."""
    try:
        return read_metrics(path)
    except (FileNotFoundError, ValueError) as err:
        raise ToolError(str(err)) from err


def run_tool(run: Callable[[Any], Any], parse_args: Callable[[Sequence[str] | None], Any],
             argv: Sequence[str] | None) -> int:
    """Parse `argv`, call `run(args)`; a ToolError prints `error: ...` and gives exit status 2."""
    args = parse_args(argv)
    try:
        run(args)
    except ToolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
