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
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.cli import ToolError, read_records, run_tool  # noqa: E402
from utils.metrics_log import is_number  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.plots import FORMATS, LAYOUTS, RETRIEVAL_METRICS, RunCurves, curves_figure, save_figure  # noqa: E402

#: What the x axis can count: both are in every train and eval record.
X_KEYS = ("epoch", "step")


def collect_curves(records: list[dict[str, Any]], name: str, x: str = "epoch") -> RunCurves:
    """The curves of one run's records, keyed by the records' `x` ("epoch" or "step").

    Train records give every `*_loss` and the total `loss`, and `lr`; text-to-image eval
    records give R1 and mAP per "<dataset> <split>". Records without a numeric `x` are skipped.
    """
    curves = RunCurves(name)
    for record in records:
        at = record.get(x)
        if not is_number(at):
            continue
        at = int(at)
        if record.get("type") == "train":
            for key, value in record.items():
                if (key == "loss" or key.endswith("_loss")) and is_number(value):
                    curves.losses.setdefault(key, {})[at] = float(value)
            if is_number(record.get("lr")):
                curves.lr[at] = float(record["lr"])
        elif record.get("type") == "eval" and record.get("task", "t2i") == "t2i":
            evaluated = f"{record.get('dataset', '?')} {record.get('split', '?')}"
            for metric in RETRIEVAL_METRICS:
                if is_number(record.get(metric)):
                    curves.retrieval.setdefault(metric, {}).setdefault(evaluated, {})[at] = float(record[metric])
    # The total first, then the terms and sets alphabetically, so colours are stable across runs.
    curves.losses = dict(sorted(curves.losses.items(), key=lambda kv: (kv[0] != "loss", kv[0])))
    curves.retrieval = {m: dict(sorted(sets.items())) for m, sets in curves.retrieval.items()}
    return curves


def run_names(paths: list[str]) -> list[str]:
    """Legend names of the runs: their folder names, or the paths as given where two folder names are alike."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [n if names.count(n) == 1 else os.path.normpath(p) for n, p in zip(names, paths)]


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
    runs = []
    for path, name in zip(args.run, run_names(args.run)):
        if not os.path.isdir(path):
            raise ToolError(f"run directory {path} not found")
        curves = collect_curves(read_records(os.path.join(path, "metrics.jsonl")), name, args.x)
        if not (curves.losses or curves.retrieval or curves.lr):
            raise ToolError(f"{os.path.join(path, 'metrics.jsonl')} has no train or eval records to plot")
        runs.append(curves)
    fig = curves_figure(runs, layout=args.layout, xlabel=args.x, figsize=figsize)
    save_figure(fig, out, fmt, dpi=args.dpi)
    for curves in runs:
        points = {x for values in curves.losses.values() for x in values}
        evaluated = {s for sets in curves.retrieval.values() for s in sets}
        print(f"{curves.name}: {len(points)} training {args.x}(s), {len(evaluated)} evaluated set(s)")
    print(f"saved {out} ({fmt})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
