"""What the command-line tools share: the user-facing error, its exit status, one-line messages.

Every script in tools/ runs its `run(args)` through :func:`run_tool`; the scripts import
this module (the library), never one another.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from utils.errors import UserInputError
from utils.metrics_log import read_metrics

__all__ = ["DEBUG_ENV", "ToolError", "one_line", "read_records", "run_tool"]

#: Set to 1 to see the traceback of user-input errors (same as --debug).
DEBUG_ENV = "GADMS_DEBUG"


class ToolError(UserInputError):
    """A user-facing problem (bad argument, missing file); printed as `error: ...`, exit status 2."""


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; problems become ToolErrors naming the file and line."""
    try:
        return read_metrics(path)
    except (FileNotFoundError, ValueError) as err:
        raise ToolError(str(err)) from err


def one_line(text: str) -> str:
    """`text` as one line: a grouped key list or a parser's context lines become clauses of it.

    Lines are joined with '; ', except after a line ending in ':' (a heading such as
    torch's "Error(s) in loading state_dict for CLIP:"), which its next line continues.
    """
    out = ""
    for line in (raw.strip() for raw in text.splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def run_tool(run: Callable[[Any], Any], parse_args: Callable[[Sequence[str] | None], Any],
             argv: Sequence[str] | None) -> int:
    """Parse `argv`, call `run(args)` and return its exit status (an int it returns, else 0).

    A `UserInputError` (bad config, annotation, image, checkpoint, argument) prints
    one `error: ...` line and gives exit status 2; `--debug` (anywhere in `argv`) or
    `GADMS_DEBUG=1` shows its traceback instead. Other exceptions are bugs and
    always keep their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = parse_args([a for a in argv if a != "--debug"])
    try:
        status = run(args)
    except UserInputError as err:
        if debug:
            raise
        print(f"error: {one_line(str(err)) or type(err).__name__}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
