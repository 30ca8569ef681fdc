#!/usr/bin/env python
"""Plot a run's training curves from its metrics.jsonl (PIL only).

    python tools/plot_curves.py --run runs/demo/finetune [--out curves.png] [--size 1100x1000]

Three panels: the loss terms per epoch (`type: train` records: every `*_loss`
and the total `loss`), text-to-image R1 per epoch for every evaluated
dataset/split (`type: eval` records), and the learning rate. When a record for
an epoch appears twice (a resumed run re-logged it) the later one wins. A run
without evaluation records gets an empty R1 panel saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from processor.evaluate import is_number  # noqa: E402
from tools.common import ToolError, read_records, run_tool  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.visualize import SERIES_COLOURS, WHITE, Series, draw_line_chart, load_font, save_png  # noqa: E402

#: Smallest figure whose three panels still fit their labels (width, height).
MIN_SIZE = (500, 700)
#: The learning-rate panel is at least this tall (px); the other two share the rest.
LR_PANEL_MIN = 170


def collect_curves(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """Per-epoch values: {"loss": {term: {epoch: v}}, "R1": {"<dataset> <split>": {epoch: v}}, "lr": {"lr": ...}}."""
    curves: dict[str, dict[str, dict[int, float]]] = {"loss": {}, "R1": {}, "lr": {}}
    for record in records:
        epoch = record.get("epoch")
        if not is_number(epoch):
            continue
        epoch = int(epoch)
        if record.get("type") == "train":
            for key, value in record.items():
                if (key == "loss" or key.endswith("_loss")) and is_number(value):
                    curves["loss"].setdefault(key, {})[epoch] = float(value)
            if is_number(record.get("lr")):
                curves["lr"].setdefault("lr", {})[epoch] = float(record["lr"])
        elif record.get("type") == "eval" and record.get("task", "t2i") == "t2i" and is_number(record.get("R1")):
            name = f"{record.get('dataset', '?')} {record.get('split', '?')}"
            curves["R1"].setdefault(name, {})[epoch] = float(record["R1"])
    # The total first, then the terms alphabetically, so colours are stable across runs.
    curves["loss"] = dict(sorted(curves["loss"].items(), key=lambda kv: (kv[0] != "loss", kv[0])))
    curves["R1"] = dict(sorted(curves["R1"].items()))
    return curves


def _series(curve: dict[str, dict[int, float]], dashed: set[str] = frozenset()) -> list[Series]:
    out = []
    for k, (name, points) in enumerate(curve.items()):
        epochs = sorted(points)
        out.append(Series(name, epochs, [points[e] for e in epochs], SERIES_COLOURS[k % len(SERIES_COLOURS)],
                          dashed=name in dashed))
    return out


def render(curves: dict[str, dict[str, dict[int, float]]], size: tuple[int, int], title: str) -> Image.Image:
    """The three-panel figure."""
    width, height = size
    canvas = Image.new("RGB", (width, height), WHITE)
    font, title_font = load_font(14), load_font(17)
    margin = 16
    usable = height - 2 * margin
    lr_h = max(LR_PANEL_MIN, usable // 5)
    heights = ((usable - lr_h) // 2, (usable - lr_h) // 2, lr_h)
    top = margin
    panels = [
        ("loss", f"{title}: training losses per epoch", "loss", "no training records"),
        ("R1", "text-to-image R1 per epoch (eval records)", "R1 (%)", "no evaluation records in this run"),
        ("lr", "learning rate", "lr", "no learning-rate records"),
    ]
    for panel_h, (key, panel_title, ylabel, empty) in zip(heights, panels):
        bottom = top + panel_h
        draw_line_chart(canvas, (margin, top, width - margin, bottom - 8), _series(curves[key], {"loss"}),
                        title=panel_title, xlabel="epoch", ylabel=ylabel, font=font, title_font=title_font,
                        empty_message=empty)
        top = bottom
    return canvas


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise ToolError(f"--size must look like 1100x1000, got {text!r}") from err
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        raise ToolError(f"--size must be at least {MIN_SIZE[0]}x{MIN_SIZE[1]}, got {text!r}")
    return width, height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output PNG (default: <run>/curves.png)")
    parser.add_argument("--size", default="1100x1000", help="figure size WIDTHxHEIGHT in pixels")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.run):
        raise ToolError(f"run directory {args.run} not found")
    size = parse_size(args.size)
    out = check_output_path(args.out or os.path.join(args.run, "curves.png"), "--out")
    curves = collect_curves(read_records(os.path.join(args.run, "metrics.jsonl")))
    name = os.path.basename(os.path.normpath(args.run))
    save_png(render(curves, size, name), out)
    epochs = sorted({e for points in curves["loss"].values() for e in points})
    print(f"{len(epochs)} training epoch(s), {len(curves['R1'])} evaluated set(s); saved {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
