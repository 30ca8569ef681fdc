#!/usr/bin/env python
"""Plot the training curves of one or more runs from their metrics.jsonl files.

    python tools/plot_curves.py --run runs/demo/finetune --out curves.pdf
    python tools/plot_curves.py --run runs/a --run runs/b --layout columns --x step --out curves.png

Panels, top to bottom, sharing the x axis (epoch, or with --x step the global
step): one per loss term of the `type: train` records (the total `loss` first,
each y axis fitted to its values), text-to-image R1 and mAP of every
evaluated dataset/split (`type: eval` records; axes from 0), and the learning
rate (scientific notation). Several runs are overlaid (one colour per run) or,
with --layout columns, sit side by side with a shared y axis per row.

The format is --format, else the --out suffix: pdf and svg are vector files,
png a bitmap of --dpi. When a record for an epoch appears twice (a resumed run
re-logged it) the later one wins.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.cli import ToolError, run_tool  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.plots import FORMATS, LAYOUTS, X_KEYS, describe_curves, plot_run_curves  # noqa: E402


def figure_format(out: str, fmt: str | None) -> str:
    """The format to write: --format, which must agree with the --out suffix when there is one, else the suffix."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if fmt is not None:
        if suffix and suffix != fmt:
            raise ToolError(f"--out {out} ends in .{suffix} but --format is {fmt}: "
                            f"name the file {Path(out).with_suffix('.' + fmt).name} or drop --format")
        return fmt
    if suffix not in FORMATS:
        raise ToolError(f"cannot tell the figure format from --out {out}: "
                        f"end it in {', '.join('.' + f for f in FORMATS)} or give --format")
    return suffix


def parse_figsize(text: str | None) -> tuple[float, float] | None:
    """'WIDTHxHEIGHT' in inches -> (width, height); None stays None (size from the panels)."""
    if text is None:
        return None
    try:
        width, height = (float(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise ToolError(f"--figsize must look like 8x12 (inches), got {text!r}") from err
    if not (2 <= width <= 100 and 2 <= height <= 100):
        raise ToolError(f"--figsize must be between 2x2 and 100x100 inches, got {text!r}")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, action="append",
                        help="run directory holding metrics.jsonl (repeat for several runs)")
    parser.add_argument("--out", required=True, help="output file (.pdf, .svg or .png)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="output format (default: the --out suffix)")
    parser.add_argument("--layout", choices=LAYOUTS, default="overlay",
                        help="several runs: overlaid in the same panels, or side by side in columns")
    parser.add_argument("--x", choices=X_KEYS, default="epoch", help="what the shared x axis counts")
    parser.add_argument("--figsize", default=None, help="figure size WIDTHxHEIGHT in inches (default: from panels)")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of png output")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    fmt = figure_format(args.out, args.format)
    figsize = parse_figsize(args.figsize)
    if not 30 <= args.dpi <= 1200:
        raise ToolError(f"--dpi must be between 30 and 1200, got {args.dpi}")
    out = check_output_path(args.out, "--out")
    runs = plot_run_curves(args.run, out, fmt, layout=args.layout, x=args.x, figsize=figsize, dpi=args.dpi)
    for curves in runs:
        print(describe_curves(curves, args.x))
    print(f"saved {out} ({fmt})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
